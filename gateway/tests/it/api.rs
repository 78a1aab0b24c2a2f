//! The /api/v1 surface.
