//! Model checks live in tests/model.rs.
