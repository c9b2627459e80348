//! warmroll's shared vocabulary: the agent–coordinator protocol (`v1`) and the small
//! checked types both sides need (image references, digests).

pub mod image;
