//! A device's side of a secure aggregation round (`[secure_aggregation]` on the coordinator; see
//! `flotilla_secagg` and docs/security.md): the key agreement and share exchange before training,
//! and the unmasking shares after the masked upload. The session (`session.rs`) calls these around
//! its training and upload.

use flotilla_secagg::client::ClientRound;
use flotilla_secagg::messages::UnmaskRequest;
use flotilla_wire::crash_test::pause_if_requested;
use flotilla_wire::framing::{read_frame, write_frame};
use flotilla_wire::protocol::{CoordinatorMessage, DeviceMessage, SecureShares, SecureTask};
use flotilla_wire::tensor::WireTensors;
use tracing::{info, warn};

use flotilla_wire::framing::FrameLimits;

/// A secure round's first two phases: fresh keys up, the neighbours' keys back; this device's
/// encrypted shares up, its neighbours' shares back. `None` when the coordinator discarded the
/// round or the device cannot take part (it then sits the round out); an error when the
/// connection fails.
pub(crate) async fn agree_secure_round(
    connection: &quinn::Connection,
    limits: &FrameLimits,
    kit: &flotilla_wire::tls::KitPaths,
    secure: &SecureTask,
    round: u32,
    rank: u32,
) -> anyhow::Result<Option<ClientRound>> {
    let sit_out = |why: String| {
        warn!("[round {round}] secure aggregation: {why}; sitting this round out");
        Ok(None)
    };
    // Crash-test hook (`flotilla_wire::crash_test`): a device that drops before sending its keys.
    pause_if_requested("before-keys", round).await;
    let (mut client, advert) =
        match ClientRound::new(secure.parameters, secure.session, secure.participant, rank, secure.layout) {
            Ok(started) => started,
            Err(error) => return sit_out(format!("cannot start: {error}")),
        };
    // Signed with this device's TLS key, so that its peers can tell it is a device of their CA.
    let signed = match flotilla_wire::signed_keys::sign(kit, advert, rank) {
        Ok(signed) => signed,
        Err(error) => return sit_out(format!("cannot sign the keys: {error}")),
    };
    let (peers, credentials) = match exchange(connection, limits, DeviceMessage::SecureKeys(signed)).await? {
        CoordinatorMessage::SecurePeers(peers) if peers.session == secure.session => (peers.peers, peers.credentials),
        CoordinatorMessage::Reject(reject) => return sit_out(format!("keys refused: {}", reject.reason)),
        other => return sit_out(format!("unexpected answer to the keys: {}", other.name())),
    };
    // Nothing is shared with a peer the CA did not vouch for, at a rank it did not sign.
    let checked = flotilla_wire::signed_keys::PeerCheck::from_kit(kit)
        .map_err(|e| e.to_string())
        .and_then(|check| check.check(secure.session, &peers, &credentials));
    if let Err(why) = checked {
        return sit_out(format!("a peer's keys are refused: {why}"));
    }
    let mut shares = match client.share_keys(&peers) {
        Ok(shares) => shares,
        Err(error) => return sit_out(format!("cannot share the keys: {error}")),
    };
    if flotilla_wire::crash_test::corruption_requested("shares", round) {
        if let Some(byte) = shares.first_mut().and_then(|s| s.ciphertext.get_mut(3)) {
            *byte ^= 1;
        }
    }
    let message = DeviceMessage::SecureShares(SecureShares { session: secure.session, shares });
    let received = match exchange(connection, limits, message).await? {
        CoordinatorMessage::SecureSharesForYou(shares) if shares.session == secure.session => shares.shares,
        CoordinatorMessage::Reject(reject) => return sit_out(format!("shares refused: {}", reject.reason)),
        other => return sit_out(format!("unexpected answer to the shares: {}", other.name())),
    };
    let refused = client.receive_shares(&received);
    if !refused.is_empty() {
        // Its pairwise mask with the sender would not cancel: sitting out leaves this device's masks
        // to the dropout recovery, which removes them from every survivor's input, so the sums stay
        // exact without it.
        let reasons: Vec<String> = refused.iter().map(ToString::to_string).collect();
        return sit_out(format!("a neighbour's share refused ({})", reasons.join("; ")));
    }
    // Crash-test hook: a device that drops after sharing its keys.
    pause_if_requested("after-shares", round).await;
    info!("[round {round}] secure aggregation: keys agreed with {} neighbour(s)", peers.len());
    Ok(Some(client))
}

/// The last phase of a secure round: the shares that let the coordinator remove the masks.
pub(crate) async fn reveal_unmasking_shares(
    connection: &quinn::Connection,
    limits: &FrameLimits,
    client: ClientRound,
    request: &UnmaskRequest,
) -> anyhow::Result<()> {
    let shares = match client.unmask(request) {
        Ok(shares) => shares,
        Err(error) => {
            warn!("secure aggregation: unmasking request refused: {error}");
            return Ok(());
        }
    };
    match exchange(connection, limits, DeviceMessage::UnmaskShares(shares)).await? {
        CoordinatorMessage::Ack(ack) => info!("[round {}] unmasking shares accepted", ack.round),
        CoordinatorMessage::Reject(reject) => warn!("unmasking shares refused: {}", reject.reason),
        other => warn!("unexpected answer to the unmasking shares: {}", other.name()),
    }
    Ok(())
}

/// One request on its own stream and its answer.
async fn exchange(
    connection: &quinn::Connection,
    limits: &FrameLimits,
    message: DeviceMessage,
) -> anyhow::Result<CoordinatorMessage> {
    let (mut send, mut recv) = connection.open_bi().await?;
    write_frame(&mut send, &message, &WireTensors::default()).await?;
    send.finish()?;
    let (reply, _) = read_frame::<_, CoordinatorMessage>(&mut recv, limits).await?;
    Ok(reply)
}
