//! Integration tests of the marketplace.
