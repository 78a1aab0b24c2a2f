//! Integration tests of kalima-core.
#[test]
fn feature_on() {
    let _ = kalima_core::Store::execute_raw;
}
