//! The `SpiffeWorkloadAPI` gRPC service over a [`Provider`].

use super::{
    Caller, Claims, ConnInfo, JwtBundles, Provider, X509Material, MAX_AUDIENCES, MAX_AUDIENCE_LEN,
    MAX_TOKEN_LEN, SECURITY_HEADER,
};
use futures::stream::BoxStream;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use weft_proto::workload_api::{
    spiffe_workload_api_server::SpiffeWorkloadApi, JwtBundlesRequest, JwtBundlesResponse, Jwtsvid,
    JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest, ValidateJwtsvidResponse,
    X509BundlesRequest, X509BundlesResponse, X509svid, X509svidRequest, X509svidResponse,
};

pub(super) struct WorkloadApi {
    pub(super) provider: Arc<dyn Provider>,
    /// Open streaming RPCs, bounded.
    pub(super) streams: Arc<Semaphore>,
    /// Cancelled on shutdown: open streams end.
    pub(super) stop: CancellationToken,
    pub(super) jwt_timeout: Duration,
}

/// The security header, then the connection's attested identity.
fn caller<T>(req: &Request<T>) -> Result<Arc<Caller>, Status> {
    match req.metadata().get(SECURITY_HEADER) {
        Some(v) if v.as_bytes() == b"true" => {}
        _ => {
            return Err(Status::invalid_argument(format!(
                "security header missing: requests must carry `{SECURITY_HEADER}: true`"
            )))
        }
    }
    req.extensions()
        .get::<ConnInfo>()
        .and_then(|c| c.caller.clone())
        .ok_or_else(|| Status::permission_denied("no identity for the calling process"))
}

/// `spiffe://<td>` for a trust domain given by name or by ID; `None` if empty.
fn trust_domain_id(td: &str) -> Option<String> {
    let name = td.strip_prefix("spiffe://").unwrap_or(td);
    (!name.is_empty()).then(|| format!("spiffe://{name}"))
}

fn concat(ders: &[Vec<u8>]) -> Vec<u8> {
    ders.concat()
}

/// The X.509 response for `m`, or `None` while it is incomplete.
fn x509_svid_response(m: &Option<X509Material>) -> Option<X509svidResponse> {
    let m = m.as_ref()?;
    if m.spiffe_id.is_empty()
        || m.chain_der.is_empty()
        || m.key_pkcs8_der.is_empty()
        || m.bundle_der.is_empty()
    {
        return None;
    }
    Some(X509svidResponse {
        svids: vec![X509svid {
            spiffe_id: m.spiffe_id.clone(),
            x509_svid: concat(&m.chain_der),
            x509_svid_key: m.key_pkcs8_der.clone(),
            bundle: concat(&m.bundle_der),
            hint: String::new(),
        }],
        crl: Vec::new(),
        federated_bundles: HashMap::new(),
    })
}

fn x509_bundles_response(m: &Option<X509Material>) -> Option<X509BundlesResponse> {
    let m = m.as_ref()?;
    let td = trust_domain_id(&m.trust_domain)?;
    if m.bundle_der.is_empty() {
        return None;
    }
    Some(X509BundlesResponse {
        crl: Vec::new(),
        bundles: HashMap::from([(td, concat(&m.bundle_der))]),
    })
}

fn jwt_bundles_response(b: &JwtBundles) -> Option<JwtBundlesResponse> {
    let bundles: HashMap<String, Vec<u8>> = b
        .iter()
        .filter_map(|(td, jwks)| Some((trust_domain_id(td)?, jwks.clone())))
        .collect();
    (!bundles.is_empty()).then_some(JwtBundlesResponse { bundles })
}

/// A response stream following `rx`: the current value's response at once (or
/// as soon as `render` gives one), then one per change of the response. A value
/// that renders to nothing after something was sent withdraws it: the stream
/// ends with `PermissionDenied`. Ends cleanly on shutdown.
fn follow<T, R>(
    rx: watch::Receiver<T>,
    render: fn(&T) -> Option<R>,
    stop: CancellationToken,
    permit: OwnedSemaphorePermit,
) -> BoxStream<'static, Result<R, Status>>
where
    T: Send + Sync + 'static,
    R: PartialEq + Clone + Send + 'static,
{
    struct State<T, R> {
        rx: watch::Receiver<T>,
        last: Option<R>,
        started: bool,
        stop: CancellationToken,
        _permit: OwnedSemaphorePermit,
    }
    let state = State {
        rx,
        last: None,
        started: false,
        stop,
        _permit: permit,
    };
    Box::pin(futures::stream::unfold(
        Some(state),
        move |state| async move {
            let mut s = state?;
            loop {
                if s.started {
                    tokio::select! {
                        _ = s.stop.cancelled() => return None,
                        changed = s.rx.changed() => {
                            if changed.is_err() {
                                // The provider dropped the sender: no more updates,
                                // the last value stands until shutdown.
                                s.stop.cancelled().await;
                                return None;
                            }
                        }
                    }
                } else if s.stop.is_cancelled() {
                    return None;
                }
                s.started = true;
                let rendered = render(&s.rx.borrow_and_update());
                match rendered {
                    Some(r) if s.last.as_ref() == Some(&r) => {}
                    Some(r) => {
                        s.last = Some(r.clone());
                        return Some((Ok(r), Some(s)));
                    }
                    None if s.last.is_some() => {
                        let denied = Status::permission_denied("the identity was withdrawn");
                        return Some((Err(denied), None));
                    }
                    None => {}
                }
            }
        },
    ))
}

impl WorkloadApi {
    fn stream_permit(&self) -> Result<OwnedSemaphorePermit, Status> {
        self.streams
            .clone()
            .try_acquire_owned()
            .map_err(|_| Status::unavailable("too many open Workload API streams"))
    }
}

fn check_audience(aud: &str) -> Result<(), Status> {
    if aud.is_empty() {
        return Err(Status::invalid_argument("an audience is empty"));
    }
    if aud.len() > MAX_AUDIENCE_LEN {
        return Err(Status::invalid_argument(format!(
            "an audience is longer than {MAX_AUDIENCE_LEN} bytes"
        )));
    }
    Ok(())
}

fn check_audiences(auds: &[String]) -> Result<(), Status> {
    if auds.is_empty() {
        return Err(Status::invalid_argument("audience is required"));
    }
    if auds.len() > MAX_AUDIENCES {
        return Err(Status::invalid_argument(format!(
            "at most {MAX_AUDIENCES} audiences"
        )));
    }
    auds.iter().try_for_each(|a| check_audience(a))
}

fn to_proto_value(v: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(to_proto_value).collect(),
        }),
        serde_json::Value::Object(o) => Kind::StructValue(to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

fn to_struct(claims: Claims) -> prost_types::Struct {
    prost_types::Struct {
        fields: claims
            .into_iter()
            .map(|(k, v)| (k, to_proto_value(v)))
            .collect(),
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = BoxStream<'static, Result<X509svidResponse, Status>>;
    type FetchX509BundlesStream = BoxStream<'static, Result<X509BundlesResponse, Status>>;
    type FetchJWTBundlesStream = BoxStream<'static, Result<JwtBundlesResponse, Status>>;

    async fn fetch_x509svid(
        &self,
        req: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let caller = caller(&req)?;
        let permit = self.stream_permit()?;
        let rx = self.provider.x509(&caller.spiffe_id);
        Ok(Response::new(follow(
            rx,
            x509_svid_response,
            self.stop.clone(),
            permit,
        )))
    }

    async fn fetch_x509_bundles(
        &self,
        req: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let caller = caller(&req)?;
        let permit = self.stream_permit()?;
        let rx = self.provider.x509(&caller.spiffe_id);
        Ok(Response::new(follow(
            rx,
            x509_bundles_response,
            self.stop.clone(),
            permit,
        )))
    }

    async fn fetch_jwtsvid(
        &self,
        req: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        let caller = caller(&req)?;
        let req = req.into_inner();
        check_audiences(&req.audience)?;
        if !req.spiffe_id.is_empty() && req.spiffe_id != caller.spiffe_id {
            return Err(Status::permission_denied(
                "the caller is not entitled to the requested SPIFFE ID",
            ));
        }
        let signing = self.provider.jwt_svid(&caller.spiffe_id, &req.audience);
        let token = tokio::time::timeout(self.jwt_timeout, signing)
            .await
            .map_err(|_| Status::unavailable("signing the JWT-SVID timed out"))??;
        if token.is_empty() {
            return Err(Status::internal("no JWT-SVID was issued"));
        }
        Ok(Response::new(JwtsvidResponse {
            svids: vec![Jwtsvid {
                spiffe_id: caller.spiffe_id.clone(),
                svid: token,
                hint: String::new(),
            }],
        }))
    }

    async fn fetch_jwt_bundles(
        &self,
        req: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        caller(&req)?;
        let permit = self.stream_permit()?;
        let rx = self.provider.jwt_bundles();
        Ok(Response::new(follow(
            rx,
            jwt_bundles_response,
            self.stop.clone(),
            permit,
        )))
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        caller(&req)?;
        let req = req.into_inner();
        if req.audience.is_empty() {
            return Err(Status::invalid_argument("audience is required"));
        }
        check_audience(&req.audience)?;
        if req.svid.is_empty() {
            return Err(Status::invalid_argument("svid is required"));
        }
        if req.svid.len() > MAX_TOKEN_LEN {
            return Err(Status::invalid_argument(format!(
                "the token is longer than {MAX_TOKEN_LEN} bytes"
            )));
        }
        let provider = self.provider.clone();
        let (spiffe_id, claims) =
            tokio::task::spawn_blocking(move || provider.validate_jwt(&req.svid, &req.audience))
                .await
                .map_err(|_| Status::internal("JWT-SVID validation failed"))??;
        Ok(Response::new(ValidateJwtsvidResponse {
            spiffe_id,
            claims: Some(to_struct(claims)),
        }))
    }
}
