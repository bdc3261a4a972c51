//! One integration-test binary: every test talks to a real gateway over real sockets.

mod broker_link;
mod cli;
mod coap;
mod coap_client;
mod coap_observe;
mod coaps;
mod cors;
mod devices;
mod devices_coap;
mod devices_scale;
mod durable;
mod emqx;
mod errors;
mod http_mqtt;
mod logins;
mod long_poll;
mod mqtt_malformed;
mod mqtt_raw;
mod mqtt_session;
mod mqtt_traps;
mod openapi;
mod rpc;
mod security;
mod sse;
mod support;
mod tls;
