//! `Modules.Fetch`: Wasm plugin modules by sha256, for nodes whose view holds a
//! plugin that uses them.

use super::auth::{NodeAuthenticator, RequestAuth};
use crate::wasm::ModuleStore;
use std::sync::Arc;
use tonic::{Request, Response, Status};
use weft_model::Model;
use weft_proto::pb::{self, modules_server::Modules, resource::Kind};

pub struct ModuleServer {
    pub model: Arc<Model>,
    /// The modules the model resolved, by sha256.
    pub modules: Arc<ModuleStore>,
    pub auth: Arc<dyn NodeAuthenticator>,
}

#[tonic::async_trait]
impl Modules for ModuleServer {
    async fn fetch(
        &self,
        req: Request<pb::FetchModuleRequest>,
    ) -> Result<Response<pb::FetchModuleResponse>, Status> {
        let node = self.auth.authenticate(&RequestAuth::of(&req)).await?;
        let sha = req.into_inner().sha256.to_ascii_lowercase();
        let used_by_node = self.model.view_of(&node).iter().any(|r| {
            matches!(&r.kind, Some(Kind::WasmPlugin(p)) if p.sha256 == sha && p.module_error.is_empty())
        });
        if !used_by_node {
            tracing::warn!(%node, %sha, "module fetch refused: no plugin in the node's view uses it");
            return Err(Status::permission_denied(format!(
                "no Wasm plugin for node {node:?} uses module {sha}"
            )));
        }
        let bytes = self.modules.get(&sha).ok_or_else(|| {
            Status::not_found(format!("module {sha} is not held by the control plane"))
        })?;
        Ok(Response::new(pb::FetchModuleResponse {
            module: bytes.as_ref().clone(),
        }))
    }
}
