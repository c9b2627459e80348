//! warmroll-coordinator library.
