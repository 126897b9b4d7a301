//! Online certificate renewal (`[renewal]`): a device sends a signing request for its own id over
//! its authenticated session and gets a new certificate from the CA this coordinator holds.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use flotilla_certs::Pki;

use crate::config::RenewalSection;

pub struct Renewal {
    pki: Arc<Pki>,
    validity: Duration,
    /// A certificate is renewed only once it ends within this time.
    window: Duration,
    /// The CA's registry is one file: sign one request at a time.
    signing: tokio::sync::Mutex<()>,
}

impl Renewal {
    /// `None` when renewal is off; an error when it is on but the CA cannot sign.
    pub fn open(section: &RenewalSection) -> anyhow::Result<Option<Renewal>> {
        let Some(root) = &section.pki else { return Ok(None) };
        let password = section
            .ca_password_file
            .as_deref()
            .map(flotilla_certs::read_password_file)
            .transpose()
            .context("renewal.ca_password_file")?;
        let pki = Pki::open(root, password).context("renewal.pki")?;
        pki.check_signing().with_context(|| format!("renewal.pki: the CA in {} cannot sign", root.display()))?;
        Ok(Some(Renewal {
            pki: Arc::new(pki),
            validity: Duration::from_secs(u64::from(section.device_validity_days) * 86_400),
            window: Duration::from_secs(u64::from(section.renew_within_days) * 86_400),
            signing: tokio::sync::Mutex::new(()),
        }))
    }

    /// A new certificate (PEM) for `device` from its request, made over a session opened with the
    /// certificate of `serial`, and when it expires.
    pub async fn renew(&self, device: &str, serial: &str, csr_pem: String) -> Result<(String, String), String> {
        let _turn = self.signing.lock().await;
        let (pki, device, serial) = (self.pki.clone(), device.to_string(), serial.to_string());
        let policy = flotilla_certs::RenewalPolicy { validity: self.validity, window: self.window };
        let signed = tokio::task::spawn_blocking(move || pki.renew_device(&device, &serial, &csr_pem, policy))
            .await
            .map_err(|e| format!("signing failed: {e}"))?;
        signed.map(|(record, pem)| (pem, record.not_after)).map_err(|e| e.to_string())
    }
}
