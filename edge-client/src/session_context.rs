//! What a device's session (`session`) and the flows it runs (`evaluation_session`,
//! `secure_session`) share: the session's settings, how far a stop request has gone, and how a
//! failure is classified (fatal, transient, stopped, the run over) by how the connection ended.

use std::net::SocketAddr;
use std::time::Duration;

use flotilla_wire::framing::FrameLimits;
use flotilla_wire::protocol::{close, HardwareProfile};
use flotilla_wire::quic::{is_certificate_failure, TransportSettings};
use flotilla_wire::tls::{own_certificate_not_after, KitPaths};

/// How far a stop request (Ctrl-C) has gone: the first lets an upload in flight finish, the second
/// abandons it. Either abandons local training (its result is never sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stop {
    Running,
    AfterUpload,
    Now,
}

/// Resolves once the stop request reaches `level`; never, if nobody can ask any more.
pub(crate) async fn stop_reached(stop: &mut tokio::sync::watch::Receiver<Stop>, level: Stop) {
    if stop.wait_for(|s| *s >= level).await.is_err() {
        std::future::pending::<()>().await;
    }
}

pub struct SessionSettings {
    /// This device's credentials; read at every connection.
    pub kit: KitPaths,
    pub transport: TransportSettings,
    /// Ask the coordinator for a new certificate when the current one ends within this time.
    pub renew_within: Option<Duration>,
    pub coordinator: SocketAddr,
    pub server_name: String,
    pub device_id: String,
    pub requested_rank: u32,
    pub hardware: HardwareProfile,
    pub limits: FrameLimits,
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub stop: tokio::sync::watch::Receiver<Stop>,
    pub progress: crate::progress::Progress,
    /// Where a transformer's checkpoint is found or fetched to.
    pub base_store: std::sync::Arc<crate::base_store::BaseStore>,
    /// The rounds this device refuses whatever the coordinator asks.
    pub floor: crate::privacy_floor::PrivacyFloor,
    /// This device's own privacy ledger, when it has a budget (`--privacy-budget`).
    pub budget: Option<std::sync::Mutex<crate::privacy_budget::DevicePrivacyBudget>>,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Retrying cannot help: the operator must act.
    #[error("{0}")]
    Fatal(String),
    #[error("{0}")]
    Transient(String),
    /// Asked to stop (Ctrl-C); the message says what became of the round in progress.
    #[error("{0}")]
    Stopped(String),
    /// The coordinator ended the run while this device was busy (a straggler's late round): the
    /// session is over, not to be retried.
    #[error("{0}")]
    RunOver(String),
}

/// Classifies a failure by how the connection ended.
pub(crate) fn classify(
    connection: &quinn::Connection,
    settings: &SessionSettings,
    context: &str,
    error: impl std::fmt::Display,
) -> SessionError {
    match connection.close_reason() {
        Some(reason) if is_certificate_failure(&reason) => SessionError::Fatal(format!(
            "the coordinator refused this device's certificate ({reason}); check that the kit comes \
             from the coordinator's CA and has not expired or been revoked"
        )),
        Some(quinn::ConnectionError::ApplicationClosed(close)) if close.error_code == close::REFUSED.into() => {
            SessionError::Fatal(format!(
                "the coordinator refused this device: {}",
                String::from_utf8_lossy(&close.reason)
            ))
        }
        Some(quinn::ConnectionError::ApplicationClosed(close)) if close.error_code == close::REVOKED.into() => {
            SessionError::Fatal(format!(
                "the coordinator ended the session: this device's certificate was revoked ({}); ask the operator \
                 for a new kit",
                String::from_utf8_lossy(&close.reason)
            ))
        }
        Some(quinn::ConnectionError::ApplicationClosed(close))
            if close.error_code == close::CERTIFICATE_EXPIRED.into() =>
        {
            match certificate_check(settings) {
                Ok(_) => SessionError::Transient(
                    "the session's certificate expired; reconnecting with the renewed certificate".into(),
                ),
                Err(fatal) => fatal,
            }
        }
        Some(quinn::ConnectionError::ApplicationClosed(close)) if close.error_code == close::DONE.into() => {
            SessionError::RunOver(format!(
                "the coordinator ended the run while this device was {context} ({}); this round's update is not in it",
                String::from_utf8_lossy(&close.reason)
            ))
        }
        _ => SessionError::Transient(format!("{context}: {error}")),
    }
}

/// When the kit's certificate expires; fatal if it already has.
pub(crate) fn certificate_check(settings: &SessionSettings) -> Result<std::time::SystemTime, SessionError> {
    let not_after = own_certificate_not_after(&settings.kit).map_err(|e| SessionError::Fatal(e.to_string()))?;
    if not_after <= std::time::SystemTime::now() {
        return Err(SessionError::Fatal(format!(
            "this device's certificate ({}) expired at {}; renew it: `flotilla-certs renew --kit {}`, have the \
             CA sign the request with `sign --renew`, then `flotilla-certs install` (or let a coordinator \
             with [renewal] renew it before it ends)",
            settings.kit.cert.display(),
            humantime::format_rfc3339_seconds(not_after),
            settings.kit.dir().display()
        )));
    }
    Ok(not_after)
}

/// Closes the connection because the device is stopping.
pub(crate) fn stopping(connection: &quinn::Connection, message: String) -> SessionError {
    connection.close(close::DONE.into(), b"device stopping");
    SessionError::Stopped(message)
}
