//! Online certificate renewal: when the kit's certificate ends within `--renew-within`, the device
//! asks the coordinator (which holds the CA) to sign a new key's request over the session, and
//! installs the certificate into its kit for its next connection.

use flotilla_wire::framing::{read_frame, write_frame, FrameLimits};
use flotilla_wire::protocol::{CoordinatorMessage, DeviceMessage, RenewCertificate};
use flotilla_wire::tensor::WireTensors;
use flotilla_wire::tls::{own_certificate_not_after, KitPaths};
use tracing::{info, warn};

/// Why a renewal could not even be asked for or answered.
pub enum RenewalError {
    /// The kit cannot be read: the operator must act.
    Kit(String),
    /// The connection failed while asking.
    Connection(String),
}

/// RenewCertificate → CertificateRenewed (installed into the kit, used from the next connection
/// on) or Refusal (logged; the current certificate serves until it ends). Only a lost connection
/// is an error.
pub(crate) async fn renew_certificate(
    connection: &quinn::Connection,
    kit: &KitPaths,
    limits: &FrameLimits,
    expires: std::time::SystemTime,
) -> Result<(), RenewalError> {
    let dir = kit.dir().to_path_buf();
    let expires = humantime::format_rfc3339_seconds(expires);
    let csr_path = match flotilla_certs::csr::renew(&dir) {
        Ok((_, path)) => path,
        Err(error) => {
            warn!("cannot make a renewal request in {}: {error}; the certificate expires at {expires}", dir.display());
            return Ok(());
        }
    };
    let csr_pem = std::fs::read_to_string(&csr_path)
        .map_err(|e| RenewalError::Kit(format!("cannot read {}: {e}", csr_path.display())))?;
    info!("certificate expires at {expires}; asking the coordinator to renew it");
    let reply = async {
        let (mut send, mut recv) = connection.open_bi().await?;
        let message = DeviceMessage::RenewCertificate(RenewCertificate { csr_pem });
        write_frame(&mut send, &message, &WireTensors::default()).await?;
        send.finish()?;
        let (reply, _) = read_frame::<_, CoordinatorMessage>(&mut recv, limits).await?;
        anyhow::Ok(reply)
    }
    .await
    .map_err(|e| RenewalError::Connection(format!("{e:#}")))?;
    match reply {
        CoordinatorMessage::CertificateRenewed(renewed) => {
            let received = dir.join("renewed.pem");
            let installed = std::fs::write(&received, renewed.certificate_pem)
                .map_err(|e| e.to_string())
                .and_then(|()| flotilla_certs::csr::install(&dir, &received, None).map_err(|e| e.to_string()));
            let _ = std::fs::remove_file(&received);
            match installed.and_then(|_| own_certificate_not_after(kit).map_err(|e| e.to_string())) {
                Ok(until) => info!(
                    "certificate renewed: valid until {}; used from the next connection on",
                    humantime::format_rfc3339_seconds(until)
                ),
                Err(error) => warn!("the renewed certificate could not be installed: {error}"),
            }
        }
        CoordinatorMessage::Refusal(refusal) => {
            warn!("certificate not renewed: {}; it expires at {expires}", refusal.reason)
        }
        other => warn!("unexpected reply to a renewal request: {other:?}"),
    }
    Ok(())
}
