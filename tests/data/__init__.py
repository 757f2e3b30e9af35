"""The data layer: preparation (both engines), the loaders, the evaluation protocol, negatives."""
