//! The commit decision on the destination: from the source (`Commit` / `Fail` / `Abort` on the
//! control connection) or, with an external decision maker, from the node's agent.

use crate::wire::{self, Msg};
use contract::{FailureKind, MigrationFailure, Phase};
use std::io::BufReader;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use trust::Conn;

/// A commit/abort decision made outside the migration stream.
#[derive(Debug, Default)]
pub struct Decision {
    state: Mutex<Option<bool>>,
    cv: Condvar,
}

impl Decision {
    /// Records the decision (the first one wins); returns the one in force.
    pub fn set(&self, commit: bool) -> bool {
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let d = *g.get_or_insert(commit);
        self.cv.notify_all();
        d
    }

    /// The decision, if one was made.
    pub fn get(&self) -> Option<bool> {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait(&self, timeout: Duration) -> Option<bool> {
        let g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (g, _) = self
            .cv
            .wait_timeout_while(g, timeout, |d| d.is_none())
            .unwrap_or_else(|e| e.into_inner());
        *g
    }
}

/// Reads the source's decision: `Ok(Some(true))` Commit, `Ok(Some(false))` it gave up,
/// `Ok(None)` a Ping; anything else is a failure (the connection is gone or the source broke
/// the protocol).
pub(super) fn read_decision(
    reader: &mut BufReader<Conn>,
    buf: &mut Vec<u8>,
) -> Result<Option<bool>, MigrationFailure> {
    let phase = Phase::Ready;
    let kind = wire::read_frame_into(reader, buf)
        .map_err(|e| super::wire_fail(phase)(e))?
        .0;
    let m = wire::decode_msg(&wire::Frame {
        kind,
        flags: 0,
        payload: std::mem::take(buf),
    })
    .map_err(|e| {
        MigrationFailure::before(phase, FailureKind::Protocol, "undecodable control message")
            .caused_by(e)
    })?;
    match m {
        Msg::Ping => Ok(None),
        Msg::Commit => Ok(Some(true)),
        m if wire::peer_failure(&m).is_some() => Ok(Some(false)),
        m => Err(super::violation(phase, &m)),
    }
}

/// Waits, in Ready state with an external decision maker, for Commit/Abort from the source or
/// a decision from `ext`. A lost source does not decide anything: only `ext` can then.
pub(super) fn await_decision(
    mut reader: BufReader<Conn>,
    ext: &Arc<Decision>,
    source_connected: &AtomicBool,
) -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let r = loop {
            match read_decision(&mut reader, &mut buf) {
                Ok(None) => continue,
                Ok(Some(d)) => break Some(d),
                Err(_) => break None,
            }
        };
        let _ = tx.send(r);
    });
    loop {
        if let Some(d) = ext.get() {
            return d;
        }
        match rx.recv_timeout(Duration::from_millis(5)) {
            Ok(Some(d)) => return ext.set(d),
            Ok(None) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                // The source is gone or spoke nonsense: wait for this node's agent, however long.
                source_connected.store(false, Ordering::SeqCst);
                loop {
                    if let Some(d) = ext.wait(Duration::from_secs(1)) {
                        return d;
                    }
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
}
