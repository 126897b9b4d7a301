//! Feeds arbitrary bytes to the frame decoder as both directions' messages: it must return a frame
//! or an error, never panic, and never allocate beyond the limits.
#![no_main]

use flotilla_common::framing::{decode_frame, FrameLimits};
use flotilla_common::protocol::{CoordinatorMessage, DeviceMessage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let limits = FrameLimits { max_body_bytes: 1 << 20, ..FrameLimits::default() };
    if let Ok((_, tensors)) = decode_frame::<DeviceMessage>(bytes, &limits) {
        assert_eq!(Some(tensors.body.len() as u64), flotilla_common::tensor::WireTensors::declared_body_len(&tensors.descs));
    }
    let _ = decode_frame::<CoordinatorMessage>(bytes, &limits);
});
