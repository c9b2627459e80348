//! warmroll-agent library.
