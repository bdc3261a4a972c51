// MQTT.js over WebSocket against the gateway's /mqtt, exchanging messages with a TCP client
// (mosquitto_pub / mosquitto_sub, run by the calling script). Prints one line per step and
// exits non-zero on the first failure or after the deadline.
//
//   node ws_exchange.mjs ws://127.0.0.1:PORT/mqtt TOPIC_PREFIX
import mqtt from "mqtt";
import { execFileSync } from "node:child_process";

const [url, prefix, mqttPort] = process.argv.slice(2);
const deadline = setTimeout(() => {
  console.error("mqttjs: timed out");
  process.exit(1);
}, 15000);

const client = mqtt.connect(url, { protocolVersion: 5, clientId: "mqttjs-e2e", reconnectPeriod: 0 });
client.on("error", (e) => {
  console.error(`mqttjs: ${e.message}`);
  process.exit(1);
});
client.on("connect", async () => {
  await client.subscribeAsync(`${prefix}/to-ws`, { qos: 1 });
  client.on("message", (topic, payload, packet) => {
    if (topic === `${prefix}/to-ws` && payload.toString() === "from tcp") {
      console.log(`mqttjs: received ${topic} from the TCP client (QoS ${packet.qos})`);
      clearTimeout(deadline);
      client.end(false, () => process.exit(0));
    }
  });
  // The TCP client's message; MQTT.js's own publish goes the other way (the script checks it).
  await client.publishAsync(`${prefix}/from-ws`, "from ws", { qos: 1, retain: true });
  console.log("mqttjs: published from WebSocket");
  execFileSync("mosquitto_pub", ["-h", "127.0.0.1", "-p", mqttPort, "-q", "1", "-t", `${prefix}/to-ws`, "-m", "from tcp"]);
});
