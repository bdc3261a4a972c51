//! MQTT from a client: the codec never panics or hangs on any bytes, and every packet it
//! accepts, written again for the same version, is accepted again.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    topicgate::fuzzing::mqtt_stream(data);
});
