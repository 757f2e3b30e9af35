"""Checkpoints and resume: `checkpoint` (the files on any storage: write, verify, read, the newest complete one),
`manager` (the job's checkpoints), `compatibility` (what a resume may change), `best` (the selected epoch's
weights) and `state` (the loop state saved with them)."""
