//! Where the model gets the key sets (JWKS) that RequestAuthentications name by
//! `jwksUri`. The control plane fetches them in the background (bounded, refreshed,
//! the last good one kept when a refresh fails) and nodes receive the keys with the
//! rules: nodes never reach a key server. A reader that does not fetch (weftctl's
//! offline analysis, tests) resolves none. The model only asks, and never waits.

/// What resolving a `jwksUri` gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksResolved {
    /// The key set's JSON text (the last one fetched that was a valid key set).
    Ready(String),
    /// Being fetched; [`JwksSource::set_on_fetched`]'s callback follows.
    Pending,
    /// Never fetched successfully: why (no secret in it).
    Failed(String),
}

/// Key sets for the model.
pub trait JwksSource: Send + Sync {
    /// Resolves `uri` for a RequestAuthentication in namespace `ns`. Must not block:
    /// a fetch runs in the background and ends with the `on_fetched` callback. Every
    /// URI asked for is refreshed periodically while it is still asked for.
    fn resolve(self: std::sync::Arc<Self>, ns: &str, uri: &str) -> JwksResolved;

    /// What to call with a namespace when a fetch (or a refresh that changed the
    /// keys) for one of its RequestAuthentications ends: the model re-derives it.
    fn set_on_fetched(&self, f: Box<dyn Fn(String) + Send + Sync>);
}

/// Fetches nothing: every `jwksUri` is reported as not resolved.
pub struct Offline;

impl JwksSource for Offline {
    fn resolve(self: std::sync::Arc<Self>, _ns: &str, _uri: &str) -> JwksResolved {
        JwksResolved::Failed("key sets are not fetched by this reader of the model".into())
    }

    fn set_on_fetched(&self, _f: Box<dyn Fn(String) + Send + Sync>) {}
}
