//! HTTP(S) client for agent-to-agent calls (and the `ferry` CLI): typed bodies from the
//! contract crate in both directions. With [`set_tls`], every request goes over HTTPS: the
//! agent reached must present a node certificate of the cluster CA, naming the node the caller
//! expects ([`node`]) or, when the caller only has an address, naming that address.

use crate::AgentError;
use contract::api::ErrorBody;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// The bearer token this process presents to agents (`ferry --token`, or an agent's node
/// token for its peers); none: requests carry no credential.
static TOKEN: RwLock<Option<String>> = RwLock::new(None);

/// Sets the token every later request of this process presents.
pub fn set_token(token: Option<String>) {
    *TOKEN.write().unwrap_or_else(|e| e.into_inner()) = token;
}

fn with_token<B>(req: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
    match TOKEN.read().unwrap_or_else(|e| e.into_inner()).as_deref() {
        Some(t) => req.header("Authorization", format!("Bearer {t}")),
        None => req,
    }
}

/// HTTPS settings of this process: the cluster CA and the certificate it presents (a user's,
/// or an agent's own node certificate), if any.
pub struct ClientTls {
    pub roots: Arc<rustls::RootCertStore>,
    pub creds: Option<trust::tls::Credentials>,
}

static TLS: RwLock<Option<Arc<ClientTls>>> = RwLock::new(None);

/// Every later request of this process uses HTTPS with `tls` (`None`: plain HTTP).
pub fn set_tls(tls: Option<ClientTls>) {
    *TLS.write().unwrap_or_else(|e| e.into_inner()) = tls.map(Arc::new);
}

fn tls() -> Option<Arc<ClientTls>> {
    TLS.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Where a request goes: an agent's address, and the node it must be when known.
#[derive(Debug, Clone, Copy)]
pub struct To<'a> {
    addr: &'a str,
    node: Option<&'a str>,
}

/// The agent of node `name`, at `addr` (its certificate must name `name`).
pub fn node<'a>(name: &'a str, addr: &'a str) -> To<'a> {
    To {
        addr,
        node: Some(name),
    }
}

impl<'a> From<&'a str> for To<'a> {
    fn from(addr: &'a str) -> To<'a> {
        To { addr, node: None }
    }
}

impl<'a> From<&'a String> for To<'a> {
    fn from(addr: &'a String) -> To<'a> {
        To { addr, node: None }
    }
}

/// A ureq agent for one request to `to`, and the request's URL base.
fn agent(to: To<'_>, timeout: Option<Duration>) -> Result<(ureq::Agent, String), AgentError> {
    let config = ureq::Agent::config_builder()
        .timeout_global(timeout)
        .http_status_as_error(false)
        .build();
    let Some(tls) = tls() else {
        let base = if to.addr.starts_with("http://") || to.addr.starts_with("https://") {
            to.addr.trim_end_matches('/').to_string()
        } else {
            format!("http://{}", to.addr)
        };
        return Ok((config.into(), base));
    };
    let bad = |e: trust::TrustError| AgentError::Internal(format!("TLS client setup: {e}"));
    let expect = match to.node {
        Some(n) => trust::api::Expect::Node(n),
        None => trust::api::Expect::AnyNodeAt,
    };
    let tls_config =
        trust::api::client_config(tls.roots.clone(), tls.creds.as_ref(), expect).map_err(bad)?;
    let name = match to.node {
        Some(n) => Some(trust::tls::node_server_name(n).map_err(bad)?),
        None => None,
    };
    let addr = to.addr.trim_start_matches("https://").trim_end_matches('/');
    if addr.starts_with("http://") {
        return Err(AgentError::BadRequest(format!(
            "{addr}: plain HTTP refused: this client is set up for HTTPS (the cluster CA)"
        )));
    }
    let agent = trust::https::agent(config, tls_config, name);
    Ok((agent, format!("https://{addr}")))
}

fn finish<T: DeserializeOwned>(
    what: &str,
    r: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
) -> Result<T, AgentError> {
    let mut resp = r.map_err(|e| AgentError::Unavailable(format!("{what}: {e}")))?;
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    if status < 300 {
        return serde_json::from_str(&text).map_err(|e| {
            AgentError::Internal(format!("{what}: unexpected answer ({e}): {}", text.trim()))
        });
    }
    let msg = serde_json::from_str::<ErrorBody>(&text)
        .map(|b| b.error)
        .unwrap_or(text);
    Err(match status {
        400 | 422 => AgentError::BadRequest(msg),
        401 | 403 => AgentError::BadRequest(format!("{what}: HTTP {status}: {msg}")),
        404 => AgentError::NotFound(msg),
        409 => AgentError::Conflict(msg),
        503 => AgentError::Unavailable(msg),
        _ => AgentError::Internal(format!("{what}: HTTP {status}: {msg}")),
    })
}

/// GET `path` from the agent at `addr`.
pub fn get<'a, T: DeserializeOwned>(to: impl Into<To<'a>>, path: &str) -> Result<T, AgentError> {
    let (agent, base) = agent(to.into(), Some(Duration::from_secs(30)))?;
    let url = format!("{base}{path}");
    finish(&url, with_token(agent.get(&url)).call())
}

/// POST a JSON body to `path`. `timeout` None: wait as long as the operation takes (drains).
pub fn post<'a, B: Serialize, T: DeserializeOwned>(
    to: impl Into<To<'a>>,
    path: &str,
    body: &B,
    timeout: Option<Duration>,
) -> Result<T, AgentError> {
    let (agent, base) = agent(to.into(), timeout)?;
    let url = format!("{base}{path}");
    finish(&url, with_token(agent.post(&url)).send_json(body))
}

/// PUT a JSON body to `path`.
pub fn put<'a, B: Serialize, T: DeserializeOwned>(
    to: impl Into<To<'a>>,
    path: &str,
    body: &B,
) -> Result<T, AgentError> {
    let (agent, base) = agent(to.into(), Some(Duration::from_secs(30)))?;
    let url = format!("{base}{path}");
    finish(&url, with_token(agent.put(&url)).send_json(body))
}

/// DELETE `path`.
pub fn delete<'a, T: DeserializeOwned>(to: impl Into<To<'a>>, path: &str) -> Result<T, AgentError> {
    let (agent, base) = agent(to.into(), Some(Duration::from_secs(60)))?;
    let url = format!("{base}{path}");
    finish(&url, with_token(agent.delete(&url)).call())
}

/// Follows a server-sent event stream, calling `on_event` with each `data:` event until it
/// returns false or the stream ends.
pub fn follow_events<'a, T: DeserializeOwned>(
    to: impl Into<To<'a>>,
    path: &str,
    mut on_event: impl FnMut(T) -> bool,
) -> Result<(), AgentError> {
    use std::io::BufRead;
    let (agent, base) = agent(to.into(), None)?;
    let url = format!("{base}{path}");
    let resp = with_token(agent.get(&url))
        .call()
        .map_err(|e| AgentError::Unavailable(format!("{url}: {e}")))?;
    if resp.status().as_u16() >= 300 {
        return finish::<serde_json::Value>(&url, Ok(resp)).map(|_| ());
    }
    let reader = std::io::BufReader::new(resp.into_body().into_reader());
    for line in reader.lines() {
        let line = line.map_err(|e| AgentError::Unavailable(format!("{url}: {e}")))?;
        if let Some(data) = line.strip_prefix("data:") {
            let ev: T = serde_json::from_str(data.trim()).map_err(|e| {
                AgentError::Internal(format!("{url}: unexpected event ({e}): {}", data.trim()))
            })?;
            if !on_event(ev) {
                break;
            }
        }
    }
    Ok(())
}
