"""Where data, checkpoints and exports live: one contract for local paths and object stores.

- `location.py`: a URI (a local path, `file://`, `s3://`, `gs://`, `hdfs://`, `memory://`) as a pyarrow
  filesystem and a path, with the reads and writes the project needs, every failure one `StorageError`
  line naming the URI. Endpoints and credentials come from each store's standard environment
  (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...; `GOOGLE_APPLICATION_CREDENTIALS`; Hadoop's own).
- `commit.py`: the commit protocol. Object stores have no atomic rename, so a dataset, checkpoint or
  export is complete only once its manifest (every file, its size and SHA-256) is written, last; readers
  use only committed ones and name what is missing.

Nothing else in the project opens a data, checkpoint or export path itself (tests/architecture/test_layers.py).
"""

from storage.commit import MANIFEST_FILE, CommitError, Manifest, committed, read_manifest, require_committed, verify
from storage.filesystems import MissingError, StorageError
from storage.location import Location, location

__all__ = ["MANIFEST_FILE", "CommitError", "Location", "Manifest", "MissingError", "StorageError", "committed",
           "location", "read_manifest", "require_committed", "verify"]
