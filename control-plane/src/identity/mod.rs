//! The mesh CA: root or user-provided intermediate, X.509-SVID signing from CSRs,
//! node credentials and the control plane's own serving certificate; and the
//! JWT-SVID signer; the CA in force during a rotation ([`authority`]) and how it is
//! stored ([`stored`]).

pub mod authority;
pub mod ca;
pub mod csr;
pub mod jwt;
pub mod stored;
#[cfg(test)]
pub(crate) mod tests;

pub use ca::{Ca, CaError, CaOptions, IssuedCert};
pub use csr::{CsrError, VerifiedCsr};
pub use jwt::{JwtError, JwtSigner};

/// Path prefix of node-agent credentials: `spiffe://<td>/_weft/node/<node>`. Workload
/// identities always start with `/ns/`, so the two can never be confused.
pub const NODE_ID_PREFIX: &str = "/_weft/node/";
