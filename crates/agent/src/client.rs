//! HTTP client for agent-to-agent calls (and the `ferry` CLI): typed bodies from the contract
//! crate in both directions.

use crate::AgentError;
use contract::api::ErrorBody;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::time::Duration;

/// The bearer token this process presents to agents (`ferry --token`, or an agent's node
/// token for its peers); none: requests carry no credential.
static TOKEN: std::sync::RwLock<Option<String>> = std::sync::RwLock::new(None);

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

fn agent(timeout: Option<Duration>) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(timeout)
        .http_status_as_error(false)
        .build()
        .into()
}

fn base(addr: &str) -> String {
    if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.trim_end_matches('/').to_string()
    } else {
        format!("http://{addr}")
    }
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
pub fn get<T: DeserializeOwned>(addr: &str, path: &str) -> Result<T, AgentError> {
    let url = format!("{}{path}", base(addr));
    finish(
        &url,
        with_token(agent(Some(Duration::from_secs(30))).get(&url)).call(),
    )
}

/// POST a JSON body to `path`. `timeout` None: wait as long as the operation takes (drains).
pub fn post<B: Serialize, T: DeserializeOwned>(
    addr: &str,
    path: &str,
    body: &B,
    timeout: Option<Duration>,
) -> Result<T, AgentError> {
    let url = format!("{}{path}", base(addr));
    finish(&url, with_token(agent(timeout).post(&url)).send_json(body))
}

/// DELETE `path`.
pub fn delete<T: DeserializeOwned>(addr: &str, path: &str) -> Result<T, AgentError> {
    let url = format!("{}{path}", base(addr));
    finish(
        &url,
        with_token(agent(Some(Duration::from_secs(60))).delete(&url)).call(),
    )
}

/// Follows a server-sent event stream, calling `on_event` with each `data:` event until it
/// returns false or the stream ends.
pub fn follow_events<T: DeserializeOwned>(
    addr: &str,
    path: &str,
    mut on_event: impl FnMut(T) -> bool,
) -> Result<(), AgentError> {
    use std::io::BufRead;
    let url = format!("{}{path}", base(addr));
    let resp = with_token(agent(None).get(&url))
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
