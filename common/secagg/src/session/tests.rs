//! The session machine in virtual time: real participants ([`ClientRound`]) exchange real messages
//! through it, deadlines are events, and every action is checked.

use std::collections::BTreeMap;

use super::{Phase, Reply, SessionAction, SessionEvent, SessionMachine};
use crate::client::ClientRound;
use crate::layout::Layout;
use crate::messages::{EncryptedShare, UnmaskRequest};
use crate::server::ServerRound;
use crate::Parameters;

const LAYOUT: Layout = Layout { shared: 3, per_slot: 2, max_rank: 4 };
const SESSION: u64 = 99;

type Action = SessionAction<String>;

/// A session of `ranks.len()` devices named d1, d2, … at those ranks, and their participants.
struct Fleet {
    machine: SessionMachine<String>,
    clients: BTreeMap<String, ClientRound>,
    adverts: BTreeMap<String, crate::messages::AdvertiseKeys>,
    ranks: BTreeMap<String, u32>,
    first: Vec<Action>,
}

fn fleet(ranks: &[u32], threshold: usize, closes_own_uploads: bool) -> Fleet {
    let parameters = Parameters { threshold, degree: ranks.len() - 1, range: 4.0, max_participants: 100 };
    let ids: BTreeMap<String, u32> = (1..=ranks.len() as u32).map(|i| (format!("d{i}"), i)).collect();
    let by_id: BTreeMap<u32, u32> = ids.values().map(|&i| (i, ranks[i as usize - 1])).collect();
    let server = ServerRound::new(parameters, SESSION, LAYOUT, by_id.clone(), 5).unwrap();
    let (machine, first) = SessionMachine::new("round 3".into(), server, ids.clone(), closes_own_uploads);
    let mut clients = BTreeMap::new();
    let mut adverts = BTreeMap::new();
    for (device, &id) in &ids {
        let (client, advert) = ClientRound::new(parameters, SESSION, id, by_id[&id], LAYOUT).unwrap();
        clients.insert(device.clone(), client);
        adverts.insert(device.clone(), advert);
    }
    let ranks = ids.iter().map(|(d, i)| (d.clone(), by_id[i])).collect();
    Fleet { machine, clients, adverts, ranks, first }
}

impl Fleet {
    fn keys(&mut self, device: &str) -> Vec<Action> {
        let advert = self.adverts[device].clone();
        let rank = self.ranks[device];
        self.machine.handle(SessionEvent::Keys {
            device: device.into(),
            advert,
            rank,
            credential: format!("cert-{device}"),
        })
    }

    /// Shares from `device` for the peers its keys reply named.
    fn shares(&mut self, device: &str, peers: &Reply<String>) -> Vec<Action> {
        let Reply::Peers { peers, .. } = peers else { panic!("not a peers reply: {peers:?}") };
        let shares = self.clients.get_mut(device).unwrap().share_keys(peers).unwrap();
        self.machine.handle(SessionEvent::Shares { device: device.into(), session: SESSION, shares })
    }

    fn masked(&mut self, device: &str, routed: &[EncryptedShare]) -> Vec<Action> {
        let client = self.clients.get_mut(device).unwrap();
        assert!(client.receive_shares(routed).is_empty());
        let values = vec![0.5; LAYOUT.len(self.ranks[device])];
        let input = client.masked_input(&values).unwrap();
        self.machine.handle(SessionEvent::Masked { device: device.into(), input })
    }

    fn unmask(&mut self, device: &str, request: &UnmaskRequest) -> Vec<Action> {
        let shares = self.clients.remove(device).unwrap().unmask(request).unwrap();
        self.machine.handle(SessionEvent::Unmask { device: device.into(), shares })
    }
}

/// The replies among `actions`, by device.
fn replies(actions: &[Action]) -> BTreeMap<String, Reply<String>> {
    actions
        .iter()
        .filter_map(|a| match a {
            SessionAction::Reply { device, reply } => Some((device.clone(), reply.clone())),
            _ => None,
        })
        .collect()
}

fn refusal(actions: &[Action]) -> String {
    match actions {
        [SessionAction::Refuse { reason, .. }] => reason.clone(),
        other => panic!("expected one refusal, got {other:?}"),
    }
}

fn shares_reply(reply: &Reply<String>) -> Vec<EncryptedShare> {
    match reply {
        Reply::Shares(shares) => shares.clone(),
        other => panic!("not a shares reply: {other:?}"),
    }
}

#[test]
fn a_whole_session_answers_each_phase_at_its_close_and_unmasks_the_sum() {
    let mut f = fleet(&[2, 4, 4, 1], 2, false);
    assert_eq!(f.first, vec![SessionAction::Entered(Phase::Keys), SessionAction::StartDeadline(Phase::Keys)]);
    for device in ["d1", "d2", "d3"] {
        assert!(f.keys(device).is_empty(), "a reply waits for the phase's close");
    }
    let closed = f.keys("d4");
    let peers = replies(&closed);
    assert_eq!(peers.len(), 4);
    let Reply::Peers { peers: of_d1, credentials } = &peers["d1"] else { panic!() };
    assert_eq!(of_d1.len(), 3, "everyone else is a neighbour");
    let named: Vec<String> = of_d1.iter().map(|p| format!("cert-d{}", p.id)).collect();
    assert_eq!(credentials, &named, "each neighbour's credential travels with its keys");
    assert!(closed.contains(&SessionAction::Entered(Phase::Shares)));
    assert!(closed.contains(&SessionAction::StartDeadline(Phase::Shares)));
    let mut routed = BTreeMap::new();
    for device in ["d1", "d2", "d3", "d4"] {
        let actions = f.shares(device, &peers[device]);
        routed.extend(replies(&actions).into_iter().map(|(d, r)| (d, shares_reply(&r))));
    }
    assert_eq!(routed.len(), 4);
    assert_eq!(f.machine.phase(), Phase::Upload);
    for device in ["d1", "d2", "d3", "d4"] {
        let accepted = f.masked(device, &routed[device]);
        assert_eq!(replies(&accepted)[device], Reply::Accepted);
        assert_eq!(accepted.len(), 1, "the driver ends the uploads, not the last upload");
    }
    let asked = f.machine.handle(SessionEvent::UploadsClosed);
    let Some(SessionAction::AskToUnmask { request, survivors }) =
        asked.iter().find(|a| matches!(a, SessionAction::AskToUnmask { .. })).cloned()
    else {
        panic!("{asked:?}")
    };
    assert_eq!(survivors, vec!["d1", "d2", "d3", "d4"]);
    assert!(asked.contains(&SessionAction::StartDeadline(Phase::Unmask)));
    for (i, device) in ["d1", "d2", "d3", "d4"].into_iter().enumerate() {
        let actions = f.unmask(device, &request);
        assert_eq!(actions.contains(&SessionAction::ReadyToUnmask), i == 3, "{actions:?}");
    }
    let aggregate = f.machine.finish().unwrap();
    assert!((aggregate.sums[0] - 2.0).abs() < 1e-3, "four devices of 0.5: {}", aggregate.sums[0]);
}

#[test]
fn a_deadline_closes_its_phase_without_the_late_and_stale_deadlines_do_nothing() {
    let mut f = fleet(&[4, 4, 4, 4, 4], 2, false);
    for device in ["d1", "d2", "d3", "d4"] {
        f.keys(device);
    }
    let closed = f.machine.handle(SessionEvent::Deadline(Phase::Keys));
    assert!(closed.contains(&SessionAction::Dropped(vec!["d5".into()])), "{closed:?}");
    assert_eq!(replies(&closed).len(), 4);
    assert!(f.machine.handle(SessionEvent::Deadline(Phase::Keys)).is_empty(), "a stale deadline");
    let late = f.keys("d5");
    assert!(refusal(&late).contains("a keys message during the shares phase of round 3"), "{late:?}");
    let peers = replies(&closed);
    let mut routed = BTreeMap::new();
    for device in ["d1", "d2", "d3"] {
        routed.extend(replies(&f.shares(device, &peers[device])).into_iter().map(|(d, r)| (d, shares_reply(&r))));
    }
    assert!(routed.is_empty(), "d4 has not shared yet");
    let closed = f.machine.handle(SessionEvent::Deadline(Phase::Shares));
    assert!(closed.contains(&SessionAction::Dropped(vec!["d4".into(), "d5".into()])), "{closed:?}");
    assert!(!closed.contains(&SessionAction::StartDeadline(Phase::Upload)), "the engine times the uploads");
    assert!(f.machine.handle(SessionEvent::Deadline(Phase::Upload)).is_empty());
}

#[test]
fn too_few_devices_at_a_close_discard_the_session_and_refuse_every_held_request() {
    let mut f = fleet(&[2, 2, 2, 2], 2, false);
    f.keys("d1");
    f.keys("d2");
    let closed = f.machine.handle(SessionEvent::Deadline(Phase::Keys));
    let refused: Vec<&String> = closed
        .iter()
        .filter_map(|a| match a {
            SessionAction::Refuse { device, reason } if reason.starts_with("secure round discarded") => Some(device),
            _ => None,
        })
        .collect();
    assert_eq!(refused, ["d1", "d2"]);
    assert!(closed.contains(&SessionAction::Dropped(vec!["d1".into(), "d2".into(), "d3".into(), "d4".into()])));
    let reason = f.machine.discarded().unwrap().to_string();
    assert!(reason.contains("2 device(s) sent keys; the threshold 2 needs more"), "{reason}");
    assert!(closed.contains(&SessionAction::Discarded(reason)));
    assert!(refusal(&f.keys("d3")).contains("round 3 was discarded"));
    assert!(f.machine.handle(SessionEvent::Deadline(Phase::Keys)).is_empty());
}

#[test]
fn foreign_repeated_and_misaddressed_messages_are_refused_and_change_nothing() {
    let mut f = fleet(&[2, 2, 2], 2, false);
    let mut advert = f.adverts["d1"].clone();
    advert.session += 1;
    let foreign =
        f.machine.handle(SessionEvent::Keys { device: "d1".into(), advert, rank: 2, credential: String::new() });
    assert!(refusal(&foreign).contains("another secure round"));
    let stranger = f.adverts["d1"].clone();
    let unknown = f.machine.handle(SessionEvent::Keys {
        device: "x".into(),
        advert: stranger,
        rank: 2,
        credential: String::new(),
    });
    assert!(refusal(&unknown).contains("'x' is not in round 3"));
    let wrong_rank = f.adverts["d1"].clone();
    let lied = f.machine.handle(SessionEvent::Keys {
        device: "d1".into(),
        advert: wrong_rank,
        rank: 4,
        credential: String::new(),
    });
    assert!(refusal(&lied).contains("keys signed at rank 4"));
    let other = f.adverts["d2"].clone();
    let posing =
        f.machine.handle(SessionEvent::Keys { device: "d1".into(), advert: other, rank: 2, credential: String::new() });
    assert!(refusal(&posing).contains("keys for participant 2, this device is 1"));
    assert!(f.keys("d1").is_empty());
    assert!(refusal(&f.keys("d1")).contains("twice"));
    let early = f.machine.handle(SessionEvent::Shares { device: "d2".into(), session: SESSION, shares: Vec::new() });
    assert!(refusal(&early).contains("a shares message during the keys phase"));
    assert_eq!(f.machine.phase(), Phase::Keys);
}

#[test]
fn a_session_that_closes_its_own_uploads_asks_to_unmask_when_all_are_in_or_at_the_deadline() {
    for all_in in [true, false] {
        let mut f = fleet(&[1, 1, 1, 1], 2, true);
        let devices = ["d1", "d2", "d3", "d4"];
        let mut closed = Vec::new();
        for device in devices {
            closed = f.keys(device);
        }
        let peers = replies(&closed);
        let mut routed = BTreeMap::new();
        let mut last = Vec::new();
        for device in devices {
            last = f.shares(device, &peers[device]);
            routed.extend(replies(&last).into_iter().map(|(d, r)| (d, shares_reply(&r))));
        }
        assert!(last.contains(&SessionAction::StartDeadline(Phase::Upload)), "{last:?}");
        for device in ["d1", "d2", "d3"] {
            let accepted = f.masked(device, &routed[device]);
            assert!(!accepted.iter().any(|a| matches!(a, SessionAction::AskToUnmask { .. })));
        }
        let closing = if all_in {
            f.masked("d4", &routed["d4"])
        } else {
            f.machine.handle(SessionEvent::Deadline(Phase::Upload))
        };
        let survivors = closing.iter().find_map(|a| match a {
            SessionAction::AskToUnmask { survivors, .. } => Some(survivors.len()),
            _ => None,
        });
        assert_eq!(survivors, Some(if all_in { 4 } else { 3 }), "{closing:?}");
    }
}

#[test]
fn the_unmask_deadline_unmasks_without_a_silent_survivor_and_later_requests_are_refused() {
    let mut f = fleet(&[2, 2, 2, 2, 2, 2], 3, false);
    let mut closed = Vec::new();
    for device in ["d1", "d2", "d3", "d4", "d5", "d6"] {
        closed = f.keys(device);
    }
    let peers = replies(&closed);
    let mut routed = BTreeMap::new();
    for device in ["d1", "d2", "d3", "d4", "d5", "d6"] {
        routed.extend(replies(&f.shares(device, &peers[device])).into_iter().map(|(d, r)| (d, shares_reply(&r))));
    }
    for device in ["d1", "d2", "d3", "d4", "d5"] {
        f.masked(device, &routed[device]);
    }
    let asked = f.machine.handle(SessionEvent::UploadsClosed);
    let request = asked
        .iter()
        .find_map(|a| match a {
            SessionAction::AskToUnmask { request, .. } => Some(request.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(request.dropped, vec![6], "d6 shared but did not upload: its masks are removed");
    for device in ["d1", "d2", "d3", "d4"] {
        f.unmask(device, &request);
    }
    assert_eq!(f.machine.handle(SessionEvent::Deadline(Phase::Unmask)), vec![SessionAction::ReadyToUnmask]);
    let late = f.unmask("d5", &request);
    assert!(refusal(&late).contains("being unmasked"), "{late:?}");
    let aggregate = f.machine.finish().unwrap();
    assert_eq!(aggregate.survivors, vec![1, 2, 3, 4, 5]);
    assert!((aggregate.sums[0] - 2.5).abs() < 1e-3, "{}", aggregate.sums[0]);
}
