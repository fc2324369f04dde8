//! Benchmarks and measurement programs for `tower-background`: see
//! `benches/` and `examples/`. This library is empty.
