//! A UDP impairment proxy for one device, written for the tests because `netem` is not available
//! here: it sits between a device and the coordinator and, in each direction, drops, delays (with
//! jitter, which also reorders) and duplicates datagrams, and it can make the device appear from a
//! new address mid-connection (QUIC connection migration): `move_while_sending` gives it a new
//! address each time it sends after a given interval, the way a phone's address changes under it while it
//! talks. Moves ride on the device's own datagrams so the coordinator always learns the newest
//! address from the packet that made it: a device that is quiet keeps its address, and what the
//! coordinator sends it then arrives.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use tokio::net::UdpSocket;

#[derive(Debug, Clone, Copy, Default)]
pub struct Impairment {
    /// Probability of dropping a datagram.
    pub loss: f64,
    pub delay: Duration,
    /// Uniform extra delay in [0, jitter]; reorders datagrams.
    pub jitter: Duration,
    /// Probability of sending a datagram twice.
    pub duplicate: f64,
}

struct State {
    impairment: Impairment,
    rng: rand::rngs::StdRng,
    /// The device's address, as last seen.
    device: Option<SocketAddr>,
    /// The socket that talks to the coordinator; replaced by `rebind`.
    upstream: Arc<UdpSocket>,
    generation: u64,
    /// Move before forwarding a device datagram when the last move is at least this old.
    move_every: Option<Duration>,
    last_move: std::time::Instant,
    moves: u64,
}

#[derive(Clone)]
pub struct ImpairProxy {
    /// Where the device should connect.
    pub address: SocketAddr,
    coordinator: SocketAddr,
    downstream: Arc<UdpSocket>,
    state: Arc<Mutex<State>>,
}

impl ImpairProxy {
    /// Starts the proxy on the current tokio runtime.
    pub async fn start(coordinator: SocketAddr, impairment: Impairment, seed: u64) -> std::io::Result<ImpairProxy> {
        let downstream = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let upstream = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let proxy = ImpairProxy {
            address: downstream.local_addr()?,
            coordinator,
            downstream: downstream.clone(),
            state: Arc::new(Mutex::new(State {
                impairment,
                rng: rand::rngs::StdRng::seed_from_u64(seed),
                device: None,
                upstream: upstream.clone(),
                generation: 0,
                move_every: None,
                last_move: std::time::Instant::now(),
                moves: 0,
            })),
        };
        // Device → coordinator.
        let forward = proxy.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = forward.downstream.recv_from(&mut buf).await {
                let (upstream, plan, moved) = {
                    let mut state = forward.state.lock().unwrap();
                    state.device = Some(from);
                    let due = state.move_every.is_some_and(|every| state.last_move.elapsed() >= every);
                    let moved = if due { forward.replace_upstream(&mut state) } else { None };
                    let plan = plan(&mut state);
                    (state.upstream.clone(), plan, moved)
                };
                if let Some((socket, generation)) = moved {
                    forward.spawn_backward(socket, generation);
                }
                let to = forward.coordinator;
                send_planned(upstream, to, buf[..n].to_vec(), plan);
            }
        });
        proxy.spawn_backward(upstream, 0);
        Ok(proxy)
    }

    /// Coordinator → device, from one upstream socket (until it is replaced).
    fn spawn_backward(&self, upstream: Arc<UdpSocket>, generation: u64) {
        let proxy = self.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, _)) = upstream.recv_from(&mut buf).await {
                let (device, plan, current) = {
                    let mut state = proxy.state.lock().unwrap();
                    (state.device, plan(&mut state), state.generation)
                };
                if current != generation {
                    // A replaced socket: late packets to the old address are lost, as on a real move.
                    return;
                }
                if let Some(device) = device {
                    send_planned(proxy.downstream.clone(), device, buf[..n].to_vec(), plan);
                }
            }
        });
    }

    /// From now on, the device moves to a new address whenever it sends and its last move is at
    /// least `every` old.
    pub fn move_while_sending(&self, every: Duration) {
        let mut state = self.state.lock().unwrap();
        state.move_every = Some(every);
        state.last_move = std::time::Instant::now();
    }

    /// How many times the device has moved.
    pub fn moves(&self) -> u64 {
        self.state.lock().unwrap().moves
    }

    fn replace_upstream(&self, state: &mut State) -> Option<(Arc<UdpSocket>, u64)> {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").ok()?;
        socket.set_nonblocking(true).ok()?;
        let fresh = Arc::new(UdpSocket::from_std(socket).ok()?);
        state.upstream = fresh.clone();
        state.generation += 1;
        state.moves += 1;
        state.last_move = std::time::Instant::now();
        Some((fresh, state.generation))
    }

    pub fn set(&self, impairment: Impairment) {
        self.state.lock().unwrap().impairment = impairment;
    }
}

/// For one datagram: the delays of its copies (none: dropped).
fn plan(state: &mut State) -> Vec<Duration> {
    let Impairment { loss, delay, jitter, duplicate } = state.impairment;
    if state.rng.random_bool(loss.clamp(0.0, 1.0)) {
        return Vec::new();
    }
    let copies = if state.rng.random_bool(duplicate.clamp(0.0, 1.0)) { 2 } else { 1 };
    (0..copies).map(|_| delay + jitter.mul_f64(state.rng.random_range(0.0..=1.0))).collect()
}

fn send_planned(socket: Arc<UdpSocket>, to: SocketAddr, datagram: Vec<u8>, delays: Vec<Duration>) {
    for delay in delays {
        let (socket, datagram) = (socket.clone(), datagram.clone());
        tokio::spawn(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let _ = socket.send_to(&datagram, to).await;
        });
    }
}
