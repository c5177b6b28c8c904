//! Key sets (JWKS) named by RequestAuthentications' `jwksUri`: fetched by the
//! control plane in the background, checked, kept and refreshed. Nodes receive the
//! keys with the rules and never reach a key server.
//!
//! Resolving never waits (the model resolves while it holds its lock): the first
//! time a URI is asked for, a fetch starts in the background and the answer is
//! `Pending`; when the fetch ends, the `on_fetched` callback is called with every
//! namespace that asked for the URI, and they are derived again. Afterwards the
//! answer is the last good key set (`Ready`), even while a refresh is in flight or
//! after a refresh failed, or, when the URI never gave one, why (`Failed`).
//!
//! A body is a good key set when [`weft_authn::compile`] accepts it as a rule's
//! JWKS. Every fetch is bounded: at most [`JwksSettings::max_bytes`] (by default
//! [`weft_authn::MAX_JWKS_BYTES`]), within [`JwksSettings::timeout`] from the
//! request's start to the body's last byte. Only `http://` and `https://` URIs are
//! fetched.
//!
//! Schedule (checked when a URI is resolved and by a background sweep that starts
//! with the first URI): a URI whose last fetch gave a good key set is fetched again
//! [`JwksSettings::refresh`] after it; one whose last fetch failed (the first one, or
//! a refresh) [`JwksSettings::retry`] after it. Namespaces are called back when the
//! answer changes: new keys, a first failure, another failure message; not when a
//! refresh gives the same keys, nor when a refresh fails while good keys are kept
//! (that is logged).
//!
//! Memory is bounded: at most [`JwksSettings::max_uris`] URIs are tracked, and a URI
//! no namespace asked for during two refresh periods is forgotten. The model asks
//! only when it derives a namespace, so a URI not asked for during one refresh period
//! is confirmed: its namespaces are called back once, and those that still use it
//! ask again.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};
use weft_model::jwks::{JwksResolved, JwksSource};

/// Longest URI tracked, in bytes.
pub const MAX_URI_BYTES: usize = 4096;

/// When and how much the store fetches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwksSettings {
    /// A good key set is fetched again this long after it was fetched (Istio's
    /// default: 20 minutes).
    pub refresh: Duration,
    /// A failed fetch is tried again this long after it ended.
    pub retry: Duration,
    /// Longest a fetch may take, from the request's start to the body's last byte.
    pub timeout: Duration,
    /// Largest body accepted, in bytes.
    pub max_bytes: usize,
    /// Most distinct URIs tracked; beyond, a new URI is refused.
    pub max_uris: usize,
}

impl Default for JwksSettings {
    fn default() -> Self {
        Self {
            refresh: Duration::from_secs(20 * 60),
            retry: Duration::from_secs(30),
            timeout: Duration::from_secs(5),
            max_bytes: weft_authn::MAX_JWKS_BYTES,
            max_uris: 1024,
        }
    }
}

impl JwksSettings {
    /// How often the background sweep looks for due refreshes and idle URIs.
    fn tick(&self) -> Duration {
        (self.refresh.min(self.retry) / 4).clamp(Duration::from_millis(10), Duration::from_secs(5))
    }
}

/// Why a URI has no key set. Its text is what status reports show: it names the
/// URI and never holds the body.
#[derive(Debug, thiserror::Error)]
enum JwksError {
    #[error("{0:?}: jwksUri must be an http:// or https:// URL")]
    Scheme(String),
    #[error("jwksUri is {0} bytes long, at most {MAX_URI_BYTES}")]
    UriTooLong(usize),
    #[error("too many distinct jwksUri: at most {0} are tracked")]
    TooMany(usize),
    #[error("{0}: no runtime to fetch on")]
    NoRuntime(String),
    #[error("GET {uri}: {source}")]
    Get {
        uri: String,
        #[source]
        source: Box<ureq::Error>,
    },
    #[error("GET {uri}: the key set is larger than {max} bytes, the largest accepted")]
    TooLarge { uri: String, max: usize },
    #[error("GET {uri}: did not end within {} s", .after.as_secs_f64())]
    Stuck { uri: String, after: Duration },
    #[error("GET {uri}: the fetch task failed: {message}")]
    Task { uri: String, message: String },
    #[error("{uri}: not a valid JWKS: not UTF-8 text")]
    NotText { uri: String },
    #[error("{uri}: not a valid JWKS: {source}")]
    Invalid {
        uri: String,
        #[source]
        source: weft_authn::RuleError,
    },
}

/// What the store knows of one URI.
struct Entry {
    /// The last key set fetched that was valid.
    good: Option<String>,
    /// Why the last fetch failed; `None` once one succeeds.
    failure: Option<String>,
    /// When the last fetch ended.
    fetched_at: Option<Instant>,
    /// A fetch in flight, since when.
    in_flight: Option<Instant>,
    /// The namespaces that asked for the URI, and when each last did.
    asked: BTreeMap<String, Instant>,
    /// When any namespace last asked.
    last_asked: Instant,
    /// Its namespaces were called back because none asked for a refresh period.
    confirming: bool,
}

impl Entry {
    fn new(now: Instant) -> Self {
        Self {
            good: None,
            failure: None,
            fetched_at: None,
            in_flight: None,
            asked: BTreeMap::new(),
            last_asked: now,
            confirming: false,
        }
    }

    /// Whether a fetch should start now.
    fn due(&self, now: Instant, s: &JwksSettings) -> bool {
        if self.in_flight.is_some() {
            return false;
        }
        let Some(at) = self.fetched_at else {
            return true;
        };
        let wait = if self.failure.is_some() {
            s.retry
        } else {
            s.refresh
        };
        now.saturating_duration_since(at) >= wait
    }

    fn answer(&self) -> JwksResolved {
        match (&self.good, &self.failure) {
            (Some(text), _) => JwksResolved::Ready(text.clone()),
            (None, Some(m)) => JwksResolved::Failed(m.clone()),
            (None, None) => JwksResolved::Pending,
        }
    }
}

type Callback = Box<dyn Fn(String) + Send + Sync>;

/// Key sets fetched from `jwksUri`s for the model: see the module's documentation.
pub struct JwksStore {
    settings: JwksSettings,
    uris: Mutex<HashMap<String, Entry>>,
    on_fetched: Mutex<Option<Arc<Callback>>>,
    /// Where fetches and the sweep run: the runtime the store was made in (the
    /// model may resolve from a thread outside it).
    rt: Option<tokio::runtime::Handle>,
    /// The background sweep was started.
    sweeping: AtomicBool,
}

impl Default for JwksStore {
    fn default() -> Self {
        Self::new(JwksSettings::default())
    }
}

fn is_http(uri: &str) -> bool {
    let has = |scheme: &str| {
        uri.get(..scheme.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(scheme))
            && uri.len() > scheme.len()
    };
    has("http://") || has("https://")
}

impl JwksStore {
    /// A store with these settings; fetches run on the current tokio runtime, if
    /// any, else on the one current when a URI is first resolved.
    pub fn new(settings: JwksSettings) -> Self {
        Self {
            settings,
            uris: Mutex::default(),
            on_fetched: Mutex::default(),
            rt: tokio::runtime::Handle::try_current().ok(),
            sweeping: AtomicBool::new(false),
        }
    }

    pub fn settings(&self) -> &JwksSettings {
        &self.settings
    }

    /// How many URIs are tracked.
    pub fn tracked(&self) -> usize {
        self.uris().len()
    }

    fn uris(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.uris.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn runtime(&self) -> Option<tokio::runtime::Handle> {
        self.rt
            .clone()
            .or_else(|| tokio::runtime::Handle::try_current().ok())
    }

    fn resolve_uri(self: Arc<Self>, ns: &str, uri: &str) -> JwksResolved {
        if !is_http(uri) {
            return JwksResolved::Failed(JwksError::Scheme(uri.to_string()).to_string());
        }
        if uri.len() > MAX_URI_BYTES {
            return JwksResolved::Failed(JwksError::UriTooLong(uri.len()).to_string());
        }
        let now = Instant::now();
        let rt = self.runtime();
        let (answer, fetch) = {
            let mut uris = self.uris();
            if !uris.contains_key(uri) && uris.len() >= self.settings.max_uris {
                return JwksResolved::Failed(
                    JwksError::TooMany(self.settings.max_uris).to_string(),
                );
            }
            let e = uris
                .entry(uri.to_string())
                .or_insert_with(|| Entry::new(now));
            e.last_asked = now;
            e.confirming = false;
            match e.asked.get_mut(ns) {
                Some(at) => *at = now,
                None => {
                    e.asked.insert(ns.to_string(), now);
                }
            }
            let mut fetch = false;
            if e.due(now, &self.settings) {
                if rt.is_some() {
                    e.in_flight = Some(now);
                    fetch = true;
                } else {
                    e.failure = Some(JwksError::NoRuntime(uri.to_string()).to_string());
                    e.fetched_at = Some(now);
                }
            }
            (e.answer(), fetch)
        };
        if let Some(rt) = rt {
            if fetch {
                self.clone().spawn_fetch(&rt, uri.to_string());
            }
            self.start_sweep(&rt);
        }
        answer
    }

    /// Starts the background sweep once. It holds the store weakly and ends with it.
    fn start_sweep(self: &Arc<Self>, rt: &tokio::runtime::Handle) {
        if self.sweeping.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak: Weak<Self> = Arc::downgrade(self);
        let period = self.settings.tick();
        rt.spawn(async move {
            let mut every = tokio::time::interval(period);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let Some(store) = weak.upgrade() else {
                    return;
                };
                store.sweep();
            }
        });
    }

    /// Forgets idle URIs, calls back the namespaces of URIs not asked for during a
    /// refresh period (so those still using them ask again), and starts due fetches.
    fn sweep(self: Arc<Self>) {
        let Some(rt) = self.runtime() else {
            return;
        };
        let now = Instant::now();
        let idle = self.settings.refresh;
        let forget = idle.saturating_mul(2);
        let mut confirm = Vec::new();
        let mut fetch = Vec::new();
        {
            let mut uris = self.uris();
            uris.retain(|uri, e| {
                e.asked
                    .retain(|_, at| now.saturating_duration_since(*at) < forget);
                let unasked = now.saturating_duration_since(e.last_asked);
                if unasked >= forget && e.in_flight.is_none() {
                    tracing::debug!(%uri, "jwksUri no longer asked for: forgotten");
                    return false;
                }
                if unasked >= idle && !e.confirming {
                    e.confirming = true;
                    confirm.extend(e.asked.keys().cloned());
                }
                if e.due(now, &self.settings) {
                    e.in_flight = Some(now);
                    fetch.push(uri.clone());
                }
                true
            });
        }
        for uri in fetch {
            self.clone().spawn_fetch(&rt, uri);
        }
        confirm.sort();
        confirm.dedup();
        self.call_back(confirm);
    }

    /// Fetches `uri` on a blocking thread and records the outcome. A fetch ends
    /// within the timeout by itself; one that has not ended well after it is
    /// recorded as failed and stays in flight until it ends, so none piles up.
    fn spawn_fetch(self: Arc<Self>, rt: &tokio::runtime::Handle, uri: String) {
        let settings = self.settings.clone();
        let u = uri.clone();
        let mut task = rt.spawn_blocking(move || fetch(&u, settings.timeout, settings.max_bytes));
        let grace = self.settings.timeout + Duration::from_secs(5);
        rt.spawn(async move {
            let got = match tokio::time::timeout(grace, &mut task).await {
                Ok(got) => got,
                Err(_) => {
                    let e = JwksError::Stuck {
                        uri: uri.clone(),
                        after: grace,
                    };
                    self.record(&uri, Err(e), false);
                    task.await
                }
            };
            let result = got.unwrap_or_else(|e| {
                Err(JwksError::Task {
                    uri: uri.clone(),
                    message: e.to_string(),
                })
            });
            self.record(&uri, result, true);
        });
    }

    /// Records the outcome of a fetch of `uri`; when the answer changed, calls back
    /// the namespaces that asked for it.
    fn record(&self, uri: &str, result: Result<String, JwksError>, ended: bool) {
        let namespaces = {
            let mut uris = self.uris();
            let Some(e) = uris.get_mut(uri) else {
                return;
            };
            if ended {
                e.in_flight = None;
            }
            e.fetched_at = Some(Instant::now());
            let changed = match result {
                Ok(text) => {
                    e.failure = None;
                    if e.good.as_deref() == Some(text.as_str()) {
                        false
                    } else {
                        tracing::info!(%uri, namespaces = ?e.asked.keys(), bytes = text.len(), "jwksUri key set fetched");
                        e.good = Some(text);
                        true
                    }
                }
                Err(err) => {
                    let message = err.to_string();
                    let repeated = e.failure.as_deref() == Some(message.as_str());
                    if e.good.is_some() {
                        if repeated {
                            tracing::debug!(%uri, error = %message, "jwksUri refresh failed again; the last good key set stays in use");
                        } else {
                            tracing::warn!(%uri, error = %message, "jwksUri refresh failed; the last good key set stays in use");
                        }
                        e.failure = Some(message);
                        false
                    } else {
                        if repeated {
                            tracing::debug!(%uri, error = %message, "jwksUri fetch failed again");
                        } else {
                            tracing::warn!(%uri, namespaces = ?e.asked.keys(), error = %message, "jwksUri fetch failed");
                        }
                        e.failure = Some(message);
                        !repeated
                    }
                }
            };
            if !changed {
                return;
            }
            e.asked.keys().cloned().collect::<Vec<_>>()
        };
        self.call_back(namespaces);
    }

    fn call_back(&self, namespaces: Vec<String>) {
        if namespaces.is_empty() {
            return;
        }
        let cb = self
            .on_fetched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(cb) = cb {
            for ns in namespaces {
                cb(ns);
            }
        }
    }
}

/// Fetches `uri` and checks that it is a key set: at most `max_bytes`, within
/// `timeout` from the request's start to the body's last byte.
fn fetch(uri: &str, timeout: Duration, max_bytes: usize) -> Result<String, JwksError> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .build()
        .into();
    let resp = agent
        .get(uri)
        .header("accept", "application/json")
        .call()
        .map_err(|e| JwksError::Get {
            uri: uri.to_string(),
            source: Box::new(e),
        })?;
    let too_large = || JwksError::TooLarge {
        uri: uri.to_string(),
        max: max_bytes,
    };
    // ureq's limit refuses a body of exactly the limit: read one byte past it.
    let bytes = resp
        .into_body()
        .with_config()
        .limit(max_bytes as u64 + 1)
        .read_to_vec()
        .map_err(|e| match e {
            ureq::Error::BodyExceedsLimit(_) => too_large(),
            e => JwksError::Get {
                uri: uri.to_string(),
                source: Box::new(e),
            },
        })?;
    if bytes.len() > max_bytes {
        return Err(too_large());
    }
    let text = String::from_utf8(bytes).map_err(|_| JwksError::NotText {
        uri: uri.to_string(),
    })?;
    weft_authn::compile(&weft_authn::JwtRule {
        issuer: "x".into(),
        jwks: text.clone(),
        ..Default::default()
    })
    .map_err(|source| JwksError::Invalid {
        uri: uri.to_string(),
        source,
    })?;
    Ok(text)
}

impl JwksSource for JwksStore {
    fn resolve(self: Arc<Self>, ns: &str, uri: &str) -> JwksResolved {
        self.resolve_uri(ns, uri)
    }

    /// Called with a namespace when the key set of one of its `jwksUri`s changed
    /// (or failed first), or to confirm it still uses one it did not ask for lately.
    fn set_on_fetched(&self, f: Box<dyn Fn(String) + Send + Sync>) {
        *self.on_fetched.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(f));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::mpsc::{error::TryRecvError, UnboundedReceiver};

    // The public halves of authn/tests/keys/rsa_a.pem and rsa_b.pem (`n` from
    // `openssl rsa -noout -modulus`, base64url without padding; e = 65537).
    const RSA_A_N: &str = "8CazhiHd6T23SskgTSdEALRcfkZrsDgVmwzJnB4ev6vPwKib36enUMN8dWoHC9NwPtnCgQg5IOjiPb7YjSKhhHzqUl6C_llM3e0kqm0luy_REH739XSFIIC0em33w2k7KuyrvaT85BdKVTuV3qdATZW6Q2bTEdFICZr0esbYhg1M_3Gqkfr9pLuDthUXHRp9xhL_Kv8dBP4DUBSUd9LBk4Dli-ssr1YTaWwwmfWhK_nS4PbZTQvFa7mfeY9OPZC-gtbIk6rcbMS1wG5f3gEYHYkjmTxSxGk-7TAvzuhIcN7LuPPOxctnNfqHC8JtE-aXT7oCR1LhAnNqBITSs-7_Nw";
    const RSA_B_N: &str = "vQcQ3s0X0PFJM0zKHTQ7ozP15iqpvYErOh3OlGBa0dTqrH_OwMxSBlptLsReuPTvF7_uJgdKeRc380psGT0_WUtpCENRM1hIYFSDm2BaH1cgMgyvpAhnh4-w1Af3qsynuWOGtLB-L5e9oi7PufXyvMCf0wtHO0JbyIt6383UfOgz7GFne3eZiPZ8H4Pc8_8_JIu9ZIEoiuCei_GfPKqChGhpzvZvNC6QVgVhUqONniEfkwu4zC4mNgEPcm7ns5ETHrujwgEd_74vPtJIjRl2ehK76qgnEdOnnoj4Mf0XrpirkjdUnqlvYmGcNGoAQp0eoxi9Rd-3vmK_CKTtak-nhQ";

    fn jwks(kid: &str, n: &str) -> String {
        serde_json::json!({ "keys": [{ "kty": "RSA", "kid": kid, "use": "sig", "n": n, "e": "AQAB" }] })
            .to_string()
    }

    fn keys_a() -> String {
        jwks("a", RSA_A_N)
    }

    fn keys_b() -> String {
        jwks("b", RSA_B_N)
    }

    const WAIT: Duration = Duration::from_secs(10);

    /// What the test server answers.
    #[derive(Clone)]
    enum Reply {
        /// `status`, a `content-length` and `body`.
        Ok(u16, Vec<u8>),
        /// 200 and `body` without a length, ended by closing the connection.
        UntilClose(Vec<u8>),
        /// Reads the request and never answers.
        Hang,
    }

    struct Server {
        base: String,
        reply: Arc<Mutex<Reply>>,
        requests: Arc<AtomicUsize>,
    }

    impl Server {
        fn set(&self, r: Reply) {
            *self.reply.lock().unwrap() = r;
        }

        fn requests(&self) -> usize {
            self.requests.load(Ordering::SeqCst)
        }

        fn uri(&self, path: &str) -> String {
            format!("{}{path}", self.base)
        }
    }

    /// An HTTP/1.1 server on a loopback port answering every request with its reply.
    async fn serve(reply: Reply) -> Server {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", l.local_addr().unwrap());
        let reply = Arc::new(Mutex::new(reply));
        let requests = Arc::new(AtomicUsize::new(0));
        let (r, n) = (reply.clone(), requests.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                let (r, n) = (r.clone(), n.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 << 10 {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => head.extend_from_slice(&buf[..k]),
                        }
                    }
                    n.fetch_add(1, Ordering::SeqCst);
                    let reply = r.lock().unwrap().clone();
                    let out = match reply {
                        Reply::Ok(status, body) => {
                            let mut out = format!(
                                "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                                body.len()
                            )
                            .into_bytes();
                            out.extend(body);
                            out
                        }
                        Reply::UntilClose(body) => {
                            let mut out = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n".to_vec();
                            out.extend(body);
                            out
                        }
                        Reply::Hang => {
                            tokio::time::sleep(Duration::from_secs(60)).await;
                            return;
                        }
                    };
                    let _ = s.write_all(&out).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        Server {
            base,
            reply,
            requests,
        }
    }

    fn ok(body: impl Into<Vec<u8>>) -> Reply {
        Reply::Ok(200, body.into())
    }

    /// A store whose `on_fetched` namespaces arrive on the receiver.
    fn store(settings: JwksSettings) -> (Arc<JwksStore>, UnboundedReceiver<String>) {
        let store = Arc::new(JwksStore::new(settings));
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        store.set_on_fetched(Box::new(move |ns| {
            let _ = tx.send(ns);
        }));
        (store, rx)
    }

    async fn next(rx: &mut UnboundedReceiver<String>) -> String {
        tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("no callback")
            .expect("callback dropped")
    }

    /// Resolves `uri` for `ns` (starting its fetch), waits for the callback and
    /// resolves again.
    async fn resolved(
        store: &Arc<JwksStore>,
        rx: &mut UnboundedReceiver<String>,
        uri: &str,
    ) -> JwksResolved {
        assert_eq!(store.clone().resolve("ns", uri), JwksResolved::Pending);
        assert_eq!(next(rx).await, "ns");
        store.clone().resolve("ns", uri)
    }

    fn failed(r: JwksResolved) -> String {
        match r {
            JwksResolved::Failed(m) => m,
            r => panic!("{r:?}"),
        }
    }

    fn invalid(text: &str) -> String {
        weft_authn::compile(&weft_authn::JwtRule {
            issuer: "x".into(),
            jwks: text.into(),
            ..Default::default()
        })
        .unwrap_err()
        .to_string()
    }

    /// Waits until `f` holds on the URI's entry, asking for the URI meanwhile (as
    /// the model does when it derives the namespace) and checking each answer.
    async fn until(
        store: &Arc<JwksStore>,
        uri: &str,
        answer: &JwksResolved,
        f: impl Fn(&Entry) -> bool,
    ) {
        let t = Instant::now();
        while !store.uris().get(uri).is_some_and(&f) {
            assert!(t.elapsed() < WAIT, "{uri}: timed out");
            assert_eq!(&store.clone().resolve("ns", uri), answer);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn settings(refresh_ms: u64) -> JwksSettings {
        JwksSettings {
            refresh: Duration::from_millis(refresh_ms),
            retry: Duration::from_millis(refresh_ms),
            ..Default::default()
        }
    }

    #[test]
    fn test_keys_are_valid_key_sets() {
        for k in [keys_a(), keys_b()] {
            let rule = weft_authn::compile(&weft_authn::JwtRule {
                issuer: "x".into(),
                jwks: k,
                ..Default::default()
            })
            .unwrap();
            assert_eq!(rule.key_count(), 1);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pending_then_ready_and_every_asking_namespace_is_called_back() {
        let server = serve(ok(keys_a())).await;
        let (store, mut rx) = store(JwksSettings::default());
        let uri = server.uri("/jwks");
        // Resolving answers at once, before the server is reached.
        assert_eq!(store.clone().resolve("a", &uri), JwksResolved::Pending);
        assert_eq!(store.clone().resolve("b", &uri), JwksResolved::Pending);
        let mut got = vec![next(&mut rx).await, next(&mut rx).await];
        got.sort();
        assert_eq!(got, ["a", "b"]);
        assert_eq!(server.requests(), 1, "one fetch for both namespaces");
        assert_eq!(
            store.clone().resolve("a", &uri),
            JwksResolved::Ready(keys_a())
        );
        assert_eq!(
            store.clone().resolve("c", &uri),
            JwksResolved::Ready(keys_a())
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(server.requests(), 1, "not fetched again before the refresh");
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_body_that_is_not_a_key_set_fails_naming_the_uri() {
        let server = serve(ok("<html>hello</html>")).await;
        let (store, mut rx) = store(JwksSettings::default());
        let uri = server.uri("/garbage");
        let m = failed(resolved(&store, &mut rx, &uri).await);
        assert_eq!(
            m,
            format!("{uri}: not a valid JWKS: {}", invalid("<html>hello</html>"))
        );
        assert!(
            m.starts_with(&format!("{uri}: not a valid JWKS: jwks: ")),
            "{m}"
        );

        // Valid JSON, no usable key.
        server.set(ok(r#"{"keys":[]}"#));
        let uri = server.uri("/empty");
        let m = failed(resolved(&store, &mut rx, &uri).await);
        assert_eq!(
            m,
            format!("{uri}: not a valid JWKS: {}", invalid(r#"{"keys":[]}"#))
        );
        assert!(m.contains("jwks.keys"), "{m}");

        server.set(ok(vec![0xff, 0xfe, b'{']));
        let uri = server.uri("/binary");
        let m = failed(resolved(&store, &mut rx, &uri).await);
        assert_eq!(m, format!("{uri}: not a valid JWKS: not UTF-8 text"));

        server.set(Reply::Ok(404, b"no".to_vec()));
        let uri = server.uri("/missing");
        let m = failed(resolved(&store, &mut rx, &uri).await);
        assert_eq!(m, format!("GET {uri}: http status: 404"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_body_over_the_limit_fails() {
        // A valid key set padded past 64 KiB with JSON whitespace.
        let mut big = keys_a().into_bytes();
        big.resize(weft_authn::MAX_JWKS_BYTES + 1, b' ');
        let too_large = |uri: &str| {
            format!("GET {uri}: the key set is larger than 65536 bytes, the largest accepted")
        };
        let server = serve(ok(big.clone())).await;
        let (store, mut rx) = store(JwksSettings::default());
        let uri = server.uri("/declared");
        assert_eq!(
            failed(resolved(&store, &mut rx, &uri).await),
            too_large(&uri)
        );
        server.set(Reply::UntilClose(big));
        let uri = server.uri("/undeclared");
        assert_eq!(
            failed(resolved(&store, &mut rx, &uri).await),
            too_large(&uri)
        );
        // Exactly at the limit is accepted.
        let mut full = keys_a().into_bytes();
        full.resize(weft_authn::MAX_JWKS_BYTES, b' ');
        let full = String::from_utf8(full).unwrap();
        server.set(Reply::UntilClose(full.clone().into_bytes()));
        let uri = server.uri("/full");
        assert_eq!(
            resolved(&store, &mut rx, &uri).await,
            JwksResolved::Ready(full)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_refresh_keeps_the_last_good_keys() {
        let server = serve(ok(keys_a())).await;
        let (store, mut rx) = store(settings(200));
        let uri = server.uri("/jwks");
        let good = JwksResolved::Ready(keys_a());
        assert_eq!(resolved(&store, &mut rx, &uri).await, good);
        server.set(ok("garbage"));
        // The refresh fails, and the last good keys are answered all along.
        until(&store, &uri, &good, |e| e.failure.is_some()).await;
        assert!(server.requests() >= 2);
        assert_eq!(store.clone().resolve("ns", &uri), good);
        server.set(Reply::Ok(503, Vec::new()));
        let says = format!("GET {uri}: http status: 503");
        until(&store, &uri, &good, |e| e.failure.as_deref() == Some(&says)).await;
        assert_eq!(store.clone().resolve("ns", &uri), good);
        // The same keys back: nothing changed, so no callback at any point.
        server.set(ok(keys_a()));
        until(&store, &uri, &good, |e| e.failure.is_none()).await;
        assert_eq!(store.clone().resolve("ns", &uri), good);
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refresh_with_new_keys_calls_back() {
        let server = serve(ok(keys_a())).await;
        let (store, mut rx) = store(settings(200));
        let uri = server.uri("/jwks");
        assert_eq!(
            resolved(&store, &mut rx, &uri).await,
            JwksResolved::Ready(keys_a())
        );
        let before = server.requests();
        server.set(ok(keys_b()));
        // Not resolved until called back: the background sweep refreshes it. (A
        // callback confirming the URI is still used may come first.)
        let t = Instant::now();
        loop {
            assert!(t.elapsed() < WAIT, "the new keys never came");
            assert_eq!(next(&mut rx).await, "ns");
            match store.clone().resolve("ns", &uri) {
                JwksResolved::Ready(k) if k == keys_b() => break,
                r => assert_eq!(r, JwksResolved::Ready(keys_a())),
            }
        }
        assert!(server.requests() > before);
        // While asked for, an unchanged refresh calls nobody back.
        let keys = JwksResolved::Ready(keys_b());
        let n = server.requests();
        until(&store, &uri, &keys, |_| server.requests() > n).await;
        while rx.try_recv().is_ok() {}
        let n = server.requests();
        until(&store, &uri, &keys, |_| server.requests() >= n + 2).await;
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_first_fetch_is_retried() {
        let server = serve(Reply::Ok(500, Vec::new())).await;
        let (store, mut rx) = store(JwksSettings {
            retry: Duration::from_millis(200),
            ..Default::default()
        });
        let uri = server.uri("/jwks");
        assert_eq!(
            failed(resolved(&store, &mut rx, &uri).await),
            format!("GET {uri}: http status: 500")
        );
        server.set(ok(keys_a()));
        assert_eq!(next(&mut rx).await, "ns");
        assert_eq!(
            store.clone().resolve("ns", &uri),
            JwksResolved::Ready(keys_a())
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_http_uris_are_fetched() {
        let (store, mut rx) = store(JwksSettings::default());
        for uri in [
            "file:///etc/passwd",
            "ftp://example.com/jwks",
            "example.com/jwks",
            "/jwks",
            "http://",
            "",
        ] {
            assert_eq!(
                store.clone().resolve("ns", uri),
                JwksResolved::Failed(format!(
                    "{uri:?}: jwksUri must be an http:// or https:// URL"
                )),
                "{uri}"
            );
        }
        let long = format!("https://example.com/{}", "a".repeat(MAX_URI_BYTES));
        assert_eq!(
            store.clone().resolve("ns", &long),
            JwksResolved::Failed(format!(
                "jwksUri is {} bytes long, at most 4096",
                long.len()
            ))
        );
        assert_eq!(store.tracked(), 0);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_server_that_never_answers_fails_within_the_timeout() {
        let server = serve(Reply::Hang).await;
        let (store, mut rx) = store(JwksSettings {
            timeout: Duration::from_secs(1),
            ..Default::default()
        });
        let uri = server.uri("/jwks");
        let t = Instant::now();
        let m = failed(resolved(&store, &mut rx, &uri).await);
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(4),
            "{took:?}"
        );
        assert_eq!(m, format!("GET {uri}: timeout: global"));
        assert_eq!(server.requests(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn distinct_uris_are_bounded() {
        let server = serve(ok(keys_a())).await;
        let (store, mut rx) = store(JwksSettings {
            max_uris: 2,
            ..Default::default()
        });
        assert_eq!(
            resolved(&store, &mut rx, &server.uri("/1")).await,
            JwksResolved::Ready(keys_a())
        );
        assert_eq!(
            resolved(&store, &mut rx, &server.uri("/2")).await,
            JwksResolved::Ready(keys_a())
        );
        assert_eq!(
            store.clone().resolve("ns", &server.uri("/3")),
            JwksResolved::Failed("too many distinct jwksUri: at most 2 are tracked".into())
        );
        // Those tracked still answer.
        assert_eq!(
            store.clone().resolve("other", &server.uri("/1")),
            JwksResolved::Ready(keys_a())
        );
        assert_eq!(store.tracked(), 2);
        assert_eq!(server.requests(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_uri_no_longer_asked_for_is_confirmed_then_forgotten() {
        let server = serve(ok(keys_a())).await;
        let (store, mut rx) = store(settings(300));
        let uri = server.uri("/jwks");
        assert_eq!(
            resolved(&store, &mut rx, &uri).await,
            JwksResolved::Ready(keys_a())
        );
        // Not asked for during a refresh period: its namespace is called back once.
        assert_eq!(next(&mut rx).await, "ns");
        // Still not asked for: forgotten after two periods, without more callbacks.
        let t = Instant::now();
        while store.tracked() > 0 {
            assert!(t.elapsed() < WAIT, "never forgotten");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
        // Asked again: fetched again.
        let before = server.requests();
        assert_eq!(
            resolved(&store, &mut rx, &uri).await,
            JwksResolved::Ready(keys_a())
        );
        assert_eq!(server.requests(), before + 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_uri_still_asked_for_is_kept() {
        let server = serve(ok(keys_a())).await;
        let (store, mut rx) = store(settings(200));
        let uri = server.uri("/jwks");
        assert_eq!(
            resolved(&store, &mut rx, &uri).await,
            JwksResolved::Ready(keys_a())
        );
        // Each confirmation is answered by asking again, as the model does.
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(1000) {
            if let Ok(ns) = rx.try_recv() {
                assert_eq!(
                    store.clone().resolve(&ns, &uri),
                    JwksResolved::Ready(keys_a())
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(store.tracked(), 1);
        assert!(server.requests() >= 3, "refreshed: {}", server.requests());
    }
}
