//! Integration tests of `tower-background` with heavier dependencies than the
//! root crate's own tests; they are in `tests/`. This library is empty.
