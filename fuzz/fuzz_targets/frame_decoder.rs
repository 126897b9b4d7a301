//! Feeds arbitrary bytes to the streaming frame decoder the coordinator runs (`read_frame_into`,
//! here through the plain-buffer sink) as both directions' messages: it must return a frame or an
//! error, never panic, and never allocate beyond the limits. This crate does not link libtorch.
#![no_main]

use flotilla_wire::framing::{decode_frame, FrameLimits};
use flotilla_wire::protocol::{CoordinatorMessage, DeviceMessage};
use flotilla_wire::tensor::WireTensors;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let limits = FrameLimits { max_body_bytes: 1 << 20, ..FrameLimits::default() };
    if let Ok((_, tensors)) = decode_frame::<DeviceMessage>(bytes, &limits) {
        assert_eq!(Some(tensors.body.len() as u64), WireTensors::declared_body_len(&tensors.descs));
    }
    let _ = decode_frame::<CoordinatorMessage>(bytes, &limits);
});
