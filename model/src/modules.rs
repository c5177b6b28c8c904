//! Where the model gets plugin modules. The control plane's store reads `file://`
//! modules and fetches `http(s)://` ones in the background; an offline reader
//! (weftctl) may resolve none. The model only asks, and never waits.

use weft_proto::crd::WasmPluginSpec;

/// Why a plugin's module is not available; `field` names the spec field to blame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleProblem {
    pub field: &'static str,
    pub reason: &'static str,
    pub message: String,
}

/// What resolving a plugin's module gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// Available to nodes by this sha256.
    Ready {
        sha256: String,
    },
    /// Being fetched; [`ModuleSource::set_on_fetched`]'s callback follows.
    Pending,
    Failed(ModuleProblem),
}

/// Plugin modules for the model.
pub trait ModuleSource: Send + Sync {
    /// Resolves the module of a plugin in namespace `ns`. Must not block: a fetch
    /// runs in the background and ends with the `on_fetched` callback.
    fn resolve(self: std::sync::Arc<Self>, ns: &str, spec: &WasmPluginSpec) -> Resolved;

    /// What to call with a namespace when a background fetch for one of its
    /// plugins ends (the model re-derives that namespace).
    fn set_on_fetched(&self, f: Box<dyn Fn(String) + Send + Sync>);
}

/// Resolves no module: for readers of the model that never fetch (weftctl's
/// offline analysis, tests). Every plugin's module is reported as not resolved.
pub struct Offline;

impl ModuleSource for Offline {
    fn resolve(self: std::sync::Arc<Self>, _ns: &str, _spec: &WasmPluginSpec) -> Resolved {
        Resolved::Failed(ModuleProblem {
            field: "spec.url",
            reason: "NotResolved",
            message: "modules are not resolved by this reader of the model".into(),
        })
    }

    fn set_on_fetched(&self, _f: Box<dyn Fn(String) + Send + Sync>) {}
}
