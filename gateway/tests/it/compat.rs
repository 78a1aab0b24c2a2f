//! Kalima REST compatibility surface.
