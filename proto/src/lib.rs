//! warmroll's shared vocabulary: the agent–coordinator protocol (`v1` on the wire,
//! [`fleet`] as checked domain types) and the small checked types both sides need (image
//! references, digests, [`units`]).

pub mod codec;
pub mod fleet;
pub mod image;
pub mod units;

/// The generated `warmroll.v1` wire types, client and server.
#[allow(clippy::all)]
pub mod v1 {
    tonic::include_proto!("warmroll.v1");

    // Hand-written `Debug` for the messages that carry registry secrets.
    impl std::fmt::Debug for BasicAuth {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("BasicAuth")
                .field("username", &self.username)
                .field("password", &"<redacted>")
                .finish()
        }
    }

    impl std::fmt::Debug for Credentials {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Credentials")
                .field("kind", &self.kind)
                .finish()
        }
    }

    impl std::fmt::Debug for credentials::Kind {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self {
                credentials::Kind::Basic(b) => f.debug_tuple("Basic").field(b).finish(),
                credentials::Kind::Token(_) => f.write_str("Token(<redacted>)"),
                credentials::Kind::IdentityToken(_) => f.write_str("IdentityToken(<redacted>)"),
            }
        }
    }
}
