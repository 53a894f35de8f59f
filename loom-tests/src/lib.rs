//! Loom models of the cache live in `tests/`; run with `--cfg loom`.
