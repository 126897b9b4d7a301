//! Key adverts signed with each device's TLS key, so that a device can tell its secure aggregation
//! peers are devices of its own CA, each a different one, at the ranks they signed: a coordinator
//! that substituted a peer's keys or invented peers would need a certificate from the CA for each.
//!
//! A device signs `flotilla-secagg keys v1 ‖ session ‖ participant ‖ rank ‖ encryption key ‖ mask
//! key` (ECDSA P-256, SHA-256, ASN.1) with the key of its kit; the coordinator relays each peer's
//! certificate and signature with its keys; the device checks the certificate against the kit's CA
//! (client authentication, within its validity) and the signature against the certificate.

use std::collections::BTreeSet;

use flotilla_secagg::messages::{AdvertiseKeys, Peer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

pub use crate::protocol::{PeerCredential, SignedKeys};
use crate::tls::{device_id_from_certificate, KitPaths, TlsError};

const CONTEXT: &[u8] = b"flotilla-secagg keys v1";

/// The bytes a device signs for `advert` at `rank`.
pub fn signed_bytes(advert: &AdvertiseKeys, rank: u32) -> Vec<u8> {
    let mut bytes = CONTEXT.to_vec();
    bytes.extend_from_slice(&advert.session.to_be_bytes());
    bytes.extend_from_slice(&advert.from.to_be_bytes());
    bytes.extend_from_slice(&rank.to_be_bytes());
    bytes.extend_from_slice(&advert.encryption_key);
    bytes.extend_from_slice(&advert.mask_key);
    bytes
}

/// Signs `advert` at `rank` with the kit's private key.
pub fn sign(kit: &KitPaths, advert: AdvertiseKeys, rank: u32) -> Result<SignedKeys, TlsError> {
    let file_err = |message: String| TlsError::File { path: kit.key.clone(), message };
    let key =
        PrivateKeyDer::from_pem_file(&kit.key).map_err(|e| file_err(format!("cannot read the private key: {e}")))?;
    let key = rustls::crypto::ring::sign::any_ecdsa_type(&key)
        .map_err(|e| file_err(format!("not an ECDSA key this device can sign with: {e}")))?;
    let signer = key
        .choose_scheme(&[rustls::SignatureScheme::ECDSA_NISTP256_SHA256])
        .ok_or_else(|| file_err("not a P-256 key".into()))?;
    let signature = signer.sign(&signed_bytes(&advert, rank)).map_err(|e| file_err(format!("cannot sign: {e}")))?;
    Ok(SignedKeys { advert, rank, signature })
}

/// Checks peers' keys against their relayed credentials and the kit's CA.
pub struct PeerCheck {
    anchors: Vec<CertificateDer<'static>>,
    own_id: String,
}

impl PeerCheck {
    pub fn from_kit(kit: &KitPaths) -> Result<PeerCheck, TlsError> {
        let anchors = CertificateDer::pem_file_iter(&kit.ca_cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| TlsError::File { path: kit.ca_cert.clone(), message: format!("cannot read the CA: {e}") })?;
        Ok(PeerCheck { anchors, own_id: crate::tls::own_device_id(kit)? })
    }

    /// Why `peers` (of round `session`) are not what devices of this CA signed, if they are not:
    /// every peer needs a credential whose certificate chains to the CA for client authentication,
    /// names a device other than this one and every other peer, and signs the peer's keys and rank.
    pub fn check(&self, session: u64, peers: &[Peer], credentials: &[PeerCredential]) -> Result<(), String> {
        let anchors = self
            .anchors
            .iter()
            .map(|c| webpki::anchor_from_trusted_cert(c).map_err(|e| format!("the kit's CA: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let mut devices = BTreeSet::from([self.own_id.clone()]);
        for peer in peers {
            let credential = credentials
                .iter()
                .find(|c| c.id == peer.id)
                .ok_or_else(|| format!("participant {} comes without a certificate and signature", peer.id))?;
            let der = CertificateDer::from(credential.certificate.as_slice());
            let certificate = webpki::EndEntityCert::try_from(&der)
                .map_err(|e| format!("participant {}: not a certificate: {e}", peer.id))?;
            certificate
                .verify_for_usage(
                    &[webpki::ring::ECDSA_P256_SHA256],
                    &anchors,
                    &[],
                    UnixTime::now(),
                    webpki::KeyUsage::client_auth(),
                    None,
                    None,
                )
                .map_err(|e| format!("participant {}: its certificate is not a device's of this CA: {e}", peer.id))?;
            let device = device_id_from_certificate(&der).map_err(|e| format!("participant {}: {e}", peer.id))?;
            if !devices.insert(device.clone()) {
                return Err(format!(
                    "participant {} is device '{device}' again: peers must be distinct devices",
                    peer.id
                ));
            }
            let advert =
                AdvertiseKeys { session, from: peer.id, encryption_key: peer.encryption_key, mask_key: peer.mask_key };
            certificate
                .verify_signature(
                    webpki::ring::ECDSA_P256_SHA256,
                    &signed_bytes(&advert, peer.rank),
                    &credential.signature,
                )
                .map_err(|e| {
                    format!("participant {} ('{device}'): its keys or rank are not what it signed: {e}", peer.id)
                })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType};

    /// A kit for device `id` signed by `ca` in `dir`.
    fn kit(dir: &std::path::Path, ca: &(Issuer<'static, KeyPair>, String), id: &str) -> KitPaths {
        use std::os::unix::fs::PermissionsExt;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(format!("urn:flotilla:device:{id}").try_into().unwrap())];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = params.signed_by(&key, &ca.0).unwrap();
        let kit = KitPaths::in_dir(&dir.join(id));
        std::fs::create_dir_all(dir.join(id)).unwrap();
        std::fs::write(&kit.ca_cert, &ca.1).unwrap();
        std::fs::write(&kit.cert, cert.pem()).unwrap();
        std::fs::write(&kit.key, key.serialize_pem()).unwrap();
        std::fs::set_permissions(&kit.key, std::fs::Permissions::from_mode(0o600)).unwrap();
        kit
    }

    fn ca(name: &str) -> (Issuer<'static, KeyPair>, String) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = params.self_signed(&key).unwrap();
        (Issuer::new(params, key), cert.pem())
    }

    fn credential(kit: &KitPaths, id: u32, rank: u32, session: u64) -> (Peer, PeerCredential) {
        let advert = AdvertiseKeys { session, from: id, encryption_key: [id as u8; 32], mask_key: [7; 32] };
        let signed = sign(kit, advert.clone(), rank).unwrap();
        let certificate = CertificateDer::from_pem_file(&kit.cert).unwrap().to_vec();
        let peer = Peer { id, rank, encryption_key: advert.encryption_key, mask_key: advert.mask_key };
        (peer, PeerCredential { id, certificate, signature: signed.signature })
    }

    #[test]
    fn peers_must_be_distinct_devices_of_this_ca_at_the_ranks_they_signed() {
        let dir = tempfile::tempdir().unwrap();
        let fleet = ca("fleet");
        let me = PeerCheck::from_kit(&kit(dir.path(), &fleet, "me")).unwrap();
        let (alice, alice_credential) = credential(&kit(dir.path(), &fleet, "alice"), 2, 4, 9);
        let (bob, bob_credential) = credential(&kit(dir.path(), &fleet, "bob"), 3, 8, 9);
        let credentials = vec![alice_credential.clone(), bob_credential.clone()];
        me.check(9, &[alice.clone(), bob.clone()], &credentials).unwrap();
        // Another session, another rank, another key: not what alice signed.
        assert!(me.check(10, std::slice::from_ref(&alice), &credentials).unwrap_err().contains("not what it signed"));
        let promoted = Peer { rank: 8, ..alice.clone() };
        assert!(me.check(9, &[promoted], &credentials).unwrap_err().contains("not what it signed"));
        let swapped = Peer { mask_key: [1; 32], ..alice.clone() };
        assert!(me.check(9, &[swapped], &credentials).unwrap_err().contains("not what it signed"));
        // No credential, a second participant for the same device, a device of another CA.
        assert!(me.check(9, std::slice::from_ref(&alice), &[]).unwrap_err().contains("without a certificate"));
        let twin = PeerCredential { id: 4, ..alice_credential.clone() };
        let twin_peer = Peer { id: 4, ..alice.clone() };
        let error = me.check(9, &[alice.clone(), twin_peer], &[alice_credential, twin]).unwrap_err();
        assert!(error.contains("is device 'alice' again"), "{error}");
        let rogue = ca("rogue");
        let (mallory, mallory_credential) = credential(&kit(dir.path(), &rogue, "mallory"), 5, 2, 9);
        let error = me.check(9, &[mallory], &[mallory_credential]).unwrap_err();
        assert!(error.contains("not a device's of this CA"), "{error}");
        // A peer claiming this device's own identity is refused too.
        let (me_again, me_credential) = credential(&kit(&dir.path().join("copy"), &fleet, "me"), 6, 2, 9);
        assert!(me.check(9, &[me_again], &[me_credential]).unwrap_err().contains("is device 'me' again"));
    }
}
