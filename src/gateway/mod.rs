//! Binds every listener, exposes the bound addresses, and runs the gateway until it is told to
//! stop, then shuts down within the grace period.

mod listen;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bridge::{Bridge, History, Journal, JournalError, RetainedStore, StoreSource};
use crate::coap::{CoapServer, CoapsError, CoapsServer};
use crate::config::Config;
use crate::devices::{Devices, DevicesError, Sharing};
use crate::http;
use crate::metrics::Metrics;
use crate::mqtt::{Broker, MqttError, RemoteBroker};
use crate::policy::Policy;
use crate::tls::{Tls, TlsError};

use self::listen::{announce, bind_all, warn_if_open};

/// Why the gateway could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A TCP or UDP address could not be bound.
    #[error("cannot listen for {protocol} on {addr}: {source}")]
    Bind {
        /// `HTTP`, `MQTT` or `CoAP`.
        protocol: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The broker failed.
    #[error(transparent)]
    Mqtt(#[from] MqttError),
    /// The retained store on disk cannot be used.
    #[error(transparent)]
    Store(#[from] JournalError),
    /// The `[tls]` files cannot be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The CoAP-over-DTLS socket cannot be bound, or its keys or certificate used.
    #[error(transparent)]
    Coaps(#[from] CoapsError),
    /// A push or pull rule is invalid, or the outbox cannot be used.
    #[error(transparent)]
    Devices(#[from] DevicesError),
    /// The HTTP server failed while running.
    #[error("the HTTP server stopped: {0}")]
    Http(std::io::Error),
}

/// A gateway with every listener bound, ready to run.
pub struct Gateway {
    config: Config,
    /// One listener per address of `Config::http_addrs`; never empty.
    http: Vec<TcpListener>,
    https: Option<(TcpListener, Tls)>,
    /// One endpoint per address of `Config::coap_addrs`; never empty.
    coap: Vec<CoapServer>,
    /// The `coaps://` socket, when `[[auth.psk]]` or `[tls]` names a key.
    coaps: Option<CoapsServer>,
    broker: BrokerMode,
    store: Arc<RetainedStore>,
    policy: Policy,
    metrics: Arc<Metrics>,
    devices: Devices,
}

/// The embedded broker, bound, or the external one to connect to.
enum BrokerMode {
    Embedded(Box<Broker>),
    External(RemoteBroker),
}

impl Gateway {
    /// Opens the retained store under the data dir, binds the HTTP, CoAP and MQTT listeners and
    /// starts the broker's router.
    pub async fn bind(config: Config) -> Result<Self, GatewayError> {
        let (journal, retained) = Journal::open(&config.data_dir)?;
        let store = Arc::new(RetainedStore::durable(journal, retained));
        let policy = Policy::new(&config.auth, &config.limits);
        let metrics = Arc::new(Metrics::default());
        let devices = Devices::open(&config, &policy, &metrics)?;
        let http = bind_all("HTTP", config.http_addrs(), TcpListener::bind, |l| {
            l.local_addr().ok()
        })
        .await?;
        let tls = Tls::load(&config.tls)?;
        let https = match &tls {
            None => None,
            Some(tls) => Some((
                TcpListener::bind(config.http.tls_addr)
                    .await
                    .map_err(|source| GatewayError::Bind {
                        protocol: "HTTPS",
                        addr: config.http.tls_addr,
                        source,
                    })?,
                tls.clone(),
            )),
        };
        let coap = bind_all(
            "CoAP",
            config.coap_addrs(),
            |addr| CoapServer::bind(addr, &config.coap),
            |c| Some(c.addr()),
        )
        .await?;
        let coaps = match crate::coap::dtls_settings(&config.auth, &config.tls)? {
            Some(settings) => {
                Some(CoapsServer::bind(&config.coap, settings, metrics.dtls.clone()).await?)
            }
            None => None,
        };
        let endpoint = config.broker.endpoint().map_err(|reason| {
            GatewayError::Mqtt(MqttError::Link(format!("broker.url {reason}")))
        })?;
        let broker = match endpoint {
            Some((host, port)) => BrokerMode::External(remote_broker(&config, host, port)),
            None => match Broker::bind(
                &config.mqtt,
                &config.mqtt_addrs(),
                config.max_payload,
                Arc::new(StoreSource(store.clone())),
                policy.clone(),
                tls,
            ) {
                Ok(b) => BrokerMode::Embedded(Box::new(b)),
                Err(MqttError::Bind { addr, source }) => {
                    return Err(GatewayError::Bind {
                        protocol: "MQTT",
                        addr,
                        source,
                    });
                }
                Err(e) => return Err(e.into()),
            },
        };
        Ok(Self {
            config,
            http,
            https,
            coap,
            coaps,
            broker,
            store,
            policy,
            metrics,
            devices,
        })
    }

    /// The first bound HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addrs()[0]
    }

    /// Every bound HTTP address (loopback IPv4 and IPv6 when none was given).
    pub fn http_addrs(&self) -> Vec<SocketAddr> {
        self.http
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// The bound HTTPS address, when `[tls]` names a certificate.
    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.https.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// The first bound CoAP address.
    pub fn coap_addr(&self) -> SocketAddr {
        self.coap[0].addr()
    }

    /// The bound CoAP-over-DTLS address, when `[[auth.psk]]` or `[tls]` names a key.
    pub fn coaps_addr(&self) -> Option<SocketAddr> {
        self.coaps.as_ref().map(CoapsServer::addr)
    }

    /// Every bound CoAP address.
    pub fn coap_addrs(&self) -> Vec<SocketAddr> {
        self.coap.iter().map(CoapServer::addr).collect()
    }

    /// The bound MQTT address of the embedded broker; `None` in front of an external broker.
    pub fn mqtt_addr(&self) -> Option<SocketAddr> {
        match &self.broker {
            BrokerMode::Embedded(broker) => Some(broker.addr()),
            BrokerMode::External(_) => None,
        }
    }

    /// The bound MQTT-over-TLS address of the embedded broker, when `[tls]` names a certificate.
    pub fn mqtts_addr(&self) -> Option<SocketAddr> {
        match &self.broker {
            BrokerMode::Embedded(broker) => broker.tls_addr(),
            BrokerMode::External(_) => None,
        }
    }

    /// Serves until `shutdown` completes, then stops within `shutdown_grace`.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), GatewayError> {
        let Self {
            config,
            http,
            https,
            coap,
            coaps,
            broker,
            store,
            policy,
            metrics,
            devices,
        } = self;
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let http_addrs: Vec<SocketAddr> = http.iter().filter_map(|l| l.local_addr().ok()).collect();

        tracing::info!(
            retained = store.len(),
            dir = %config.data_dir.display(),
            "retained store loaded"
        );
        let mut broker_stats = None;
        let mut ready = None;
        let mut sharing = None;
        let link = match broker {
            BrokerMode::Embedded(broker) => {
                broker_stats = Some(broker.stats());
                let mqtt_addrs = broker.addrs();
                let mqtts_addr = broker.tls_addr();
                let (link, bound) =
                    broker.run(config.bridge.link_buffer, &tracker, cancel.clone())?;
                ready = Some(bound);
                for addr in &mqtt_addrs {
                    tracing::info!(protocol = "mqtt", %addr, "listening");
                    warn_if_open(&policy, "mqtt", *addr);
                }
                tracing::info!(
                    protocol = "mqtt+ws",
                    path = "/mqtt",
                    "MQTT over WebSocket on the HTTP listeners"
                );
                if let Some(addr) = mqtts_addr {
                    tracing::info!(protocol = "mqtts", %addr, "listening");
                    warn_if_open(&policy, "mqtts", addr);
                }
                link
            }
            BrokerMode::External(remote) => {
                tracing::info!(url = %config.broker.url, "fronting an external broker");
                sharing = Some(share_devices(&remote, &tracker, &cancel));
                crate::mqtt::connect_remote(
                    remote,
                    config.bridge.link_buffer,
                    &tracker,
                    cancel.clone(),
                )
            }
        };

        let bridge = Bridge::new(
            store.clone(),
            link,
            metrics,
            policy.clone(),
            config.max_payload,
            config.http.sse_buffer,
            History {
                messages: config.http.sse_history,
                bytes: config.http.sse_history_bytes,
            },
            config.rpc.clone(),
        );
        // Attached before anything can publish, so every accepted message reaches the outbox.
        let devices = devices.start(&bridge, sharing, &tracker, &cancel);
        // MQTT clients are accepted once their publishes have somewhere to go.
        let acceptor = ready
            .map(|ready| ready.accept_clients(bridge.inbound()))
            .transpose()?;
        tracker.spawn(bridge.clone().run(cancel.clone()));
        if let Some(stats) = broker_stats
            && !config.mqtt.sys_interval.is_zero()
        {
            tracker.spawn(crate::bridge::sys::run(
                bridge.clone(),
                stats,
                config.mqtt.sys_interval,
                cancel.clone(),
            ));
        }

        for endpoint in coap {
            let addr = endpoint.addr();
            tracker.spawn(endpoint.run(bridge.clone(), tracker.clone(), cancel.clone()));
            tracing::info!(protocol = "coap", %addr, "listening");
            warn_if_open(&policy, "coap", addr);
        }
        if let Some(endpoint) = coaps {
            let addr = endpoint.addr();
            tracker.spawn(endpoint.run(bridge.clone(), tracker.clone(), cancel.clone()));
            tracing::info!(protocol = "coaps", %addr, "listening");
        }

        let draining = CancellationToken::new();
        // MQTT over WebSocket: the HTTP side answers the upgrade, the broker serves the stream.
        let mqtt_ws = acceptor.map(|acceptor| -> http::MqttAcceptor {
            Arc::new(move |pending: http::PendingStream, peer, certified| {
                acceptor.serve(pending, peer, certified);
            })
        });
        let router = http::router(
            bridge,
            config.http.clone(),
            cancel.clone(),
            draining.clone(),
            mqtt_ws,
        );
        let listening = http::Listening {
            max_connections: config.http.max_connections,
            header_timeout: config.http.header_timeout,
            tls: None,
        };
        let mut http_tasks = tokio::task::JoinSet::new();
        for listener in http {
            let served = http::serve(listener, router.clone(), listening.clone(), cancel.clone());
            http_tasks.spawn(tracker.track_future(served));
        }
        for &addr in &http_addrs {
            tracing::info!(protocol = "http", %addr, "listening");
            warn_if_open(&policy, "http", addr);
        }
        let mut https_task = match https {
            None => None,
            Some((listener, tls)) => {
                let addr = listener.local_addr().unwrap_or(config.http.tls_addr);
                let listening = http::Listening {
                    tls: Some(tls),
                    ..listening
                };
                tracing::info!(protocol = "https", %addr, "listening");
                warn_if_open(&policy, "https", addr);
                Some(tracker.spawn(http::serve(listener, router, listening, cancel.clone())))
            }
        };
        announce(&config, &http_addrs);
        let https_stopped = async {
            match https_task.as_mut() {
                Some(task) => task.await,
                None => std::future::pending().await,
            }
        };

        let outcome = tokio::select! {
            () = shutdown => Ok(()),
            Some(res) = http_tasks.join_next() => served(res),
            res = https_stopped => served(res),
        };
        draining.cancel();
        if outcome.is_ok() && !config.shutdown_drain.is_zero() {
            tracing::info!(drain = ?config.shutdown_drain, "draining: /readyz answers 503");
            tokio::time::sleep(config.shutdown_drain).await;
        }
        tracing::info!(grace = ?config.shutdown_grace, "shutting down");
        cancel.cancel();
        tracker.close();
        if tokio::time::timeout(config.shutdown_grace, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("grace period over with work still running; stopping anyway");
        }
        devices.close().await;
        if let Err(e) = store.close().await {
            tracing::error!(error = %e, "the retained store could not be flushed");
        }
        outcome
    }
}

/// What a stopped HTTP or HTTPS server means for the gateway.
fn served(res: Result<std::io::Result<()>, tokio::task::JoinError>) -> Result<(), GatewayError> {
    match res {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(GatewayError::Http(e)),
        Err(e) => Err(GatewayError::Http(std::io::Error::other(e))),
    }
}

/// Device rules in front of an external broker: push rules on shared subscriptions, pull rules
/// under leases, each on a connection of its own.
fn share_devices(
    remote: &RemoteBroker,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) -> Sharing {
    let (broker, tracker_, cancel_) = (remote.clone(), tracker.clone(), cancel.clone());
    let subscribe = move |group: String, filter: &crate::bridge::TopicFilter| {
        let filter = filter.as_str().to_owned();
        crate::mqtt::subscribe_shared(broker.clone(), group, filter, &tracker_, cancel_.clone())
    };
    let (broker, tracker, cancel) = (remote.clone(), tracker.clone(), cancel.clone());
    let lease =
        move |topic: String| crate::mqtt::lease(broker.clone(), topic, &tracker, cancel.clone());
    Sharing {
        subscribe: Box::new(subscribe),
        lease: Box::new(lease),
    }
}

/// The external broker at `host:port`, with the configuration's credentials and limits.
fn remote_broker(config: &Config, host: String, port: u16) -> RemoteBroker {
    RemoteBroker {
        host,
        port,
        username: config.broker.username.clone(),
        password: config.broker.password.clone(),
        keep_alive: config.broker.keep_alive,
        max_backoff: config.broker.max_backoff,
        // Room for the topic and properties around the largest payload.
        max_packet: config.max_payload + 64 * 1024,
    }
}
