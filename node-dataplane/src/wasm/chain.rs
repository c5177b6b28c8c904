//! The plugins that apply to a request, in order: by phase (AUTHN, AUTHZ, then
//! weft's L7 authorization, then STATS, unspecified), then priority (higher first),
//! then name. Response callbacks run in reverse order, as an HTTP filter chain does.

use super::abi::{HttpState, LocalReply};
use super::plugin::{Handle, Outcome, Plugin, Probe};
use std::sync::Arc;

/// Sorts plugins into execution order.
pub fn order(plugins: &mut [Arc<Plugin>]) {
    plugins.sort_by(|a, b| {
        a.phase
            .cmp(&b.phase)
            .then(b.priority.cmp(&a.priority))
            .then(a.id.cmp(&b.id))
    });
}

/// Plugins that saw a request, to run its response and end callbacks.
#[derive(Default)]
pub struct Ran {
    pub entries: Vec<(Arc<Plugin>, Handle)>,
}

/// Runs the request-headers callbacks of `plugins` in order until one replies
/// locally. Returns that reply, if any.
pub fn run_request(
    plugins: &[Arc<Plugin>],
    http: &mut Box<HttpState>,
    end_of_stream: bool,
    ran: &mut Ran,
) -> Option<(LocalReply, String)> {
    for p in plugins {
        let (outcome, handle) = p.on_request(http, end_of_stream);
        if let Some(h) = handle {
            ran.entries.push((p.clone(), h));
        }
        match outcome {
            Outcome::Continue | Outcome::Skipped => {}
            Outcome::Reply(r) => return Some((r, p.id.clone())),
        }
    }
    None
}

/// The plugins that saw the request and have a callback for the request's body
/// (in their order) or the response's (`response`: in reverse, as the response
/// headers').
fn with_body_callback<'a>(
    ran: &'a Ran,
    response: bool,
) -> Box<dyn Iterator<Item = &'a (Arc<Plugin>, Handle)> + 'a> {
    if response {
        Box::new(
            ran.entries
                .iter()
                .rev()
                .filter(|(p, _)| p.has_response_body_callback()),
        )
    } else {
        Box::new(
            ran.entries
                .iter()
                .filter(|(p, _)| p.has_request_body_callback()),
        )
    }
}

/// Asks the plugins with a callback for the request's (`response`: response's)
/// body whether they read it. `Ok(true)`: one does, and the body is buffered for
/// them; or a plugin's local reply.
pub fn probe_body(
    ran: &Ran,
    http: &mut Box<HttpState>,
    response: bool,
) -> Result<bool, (LocalReply, String)> {
    let mut wants = false;
    for (p, h) in with_body_callback(ran, response) {
        match p.probe_body(*h, http, response) {
            Probe::Wants => wants = true,
            Probe::Ignores => {}
            Probe::Reply(r) => return Err((r, p.id.clone())),
        }
    }
    Ok(wants)
}

/// Runs the body callbacks of the plugins that read bodies on the whole body in
/// `http.request_body` (`response`: `http.response_body`), each seeing what the
/// one before left. Returns a local reply, if one sent it.
pub fn run_body(
    ran: &Ran,
    http: &mut Box<HttpState>,
    response: bool,
) -> Option<(LocalReply, String)> {
    for (p, h) in with_body_callback(ran, response) {
        if let Some(r) = p.on_body(*h, http, response) {
            return Some((r, p.id.clone()));
        }
    }
    None
}

/// Runs the response-headers callbacks in reverse order. A plugin may replace the
/// response with a local reply.
pub fn run_response(
    ran: &Ran,
    http: &mut Box<HttpState>,
    end_of_stream: bool,
) -> Option<(LocalReply, String)> {
    for (p, h) in ran.entries.iter().rev() {
        if let Some(r) = p.on_response(*h, http, end_of_stream) {
            return Some((r, p.id.clone()));
        }
    }
    None
}

/// Ends every context (`proxy_on_done`, `proxy_on_log`, `proxy_on_delete`) and
/// empties `ran`, keeping its buffer for the next request.
pub fn finish(ran: &mut Ran, http: &mut Box<HttpState>) {
    for (p, h) in ran.entries.drain(..) {
        p.finish(h, http);
    }
}
