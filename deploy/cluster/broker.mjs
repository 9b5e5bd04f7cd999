// One node of a pear_mqtt network's clustered broker: aedes, with sessions, retained messages
// and the message bus in redis, behind mutual TLS. The rules come from the JSON file that
// `pear-mqtt broker render --flavor cluster` writes (pear_mqtt.model.topics.acl_rules, the
// source mosquitto's ACL file is made from); their semantics are pear_mqtt.ops.embedded.policy's.
// Usage: node broker.mjs NODE.json  (deploy/cluster/README.md)

import { readFileSync } from 'node:fs'
import { createServer } from 'node:tls'
import { Aedes } from 'aedes'
import redisPersistence from 'aedes-persistence-redis'
import redisEmitter from 'mqemitter-redis'

const IDENTIFIER = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/

function fail (message) {
  process.stderr.write(`pear cluster broker: ${message}\n`)
  process.exit(2)
}

function topicMatches (filter, topic) {
  if (topic.startsWith('$') && (filter[0] === '+' || filter[0] === '#')) return false
  const levels = topic.split('/')
  const filterLevels = filter.split('/')
  for (let i = 0; i < filterLevels.length; i++) {
    const level = filterLevels[i]
    if (level === '#') return true
    if (i >= levels.length || (level !== '+' && level !== levels[i])) return false
  }
  return levels.length === filterLevels.length
}

// Whether every topic `inner` can match is matched by `outer` (what a SUBSCRIBE needs).
function filterCovers (outer, inner) {
  const outerLevels = outer.split('/')
  const innerLevels = inner.split('/')
  const dollar = innerLevels[0].startsWith('$')
  for (let i = 0; i < outerLevels.length; i++) {
    const level = outerLevels[i]
    if (level === '#') return !(i === 0 && dollar)
    if (i >= innerLevels.length || innerLevels[i] === '#') return false
    if (level === '+') {
      if (i === 0 && dollar) return false
      continue
    }
    if (level !== innerLevels[i]) return false
  }
  return innerLevels.length === outerLevels.length
}

class Policy {
  constructor (rules) {
    this.rules = rules
    this.byUser = new Map()
  }

  rulesFor (user, clientId) {
    const key = `${user}\u0000${clientId}`
    let resolved = this.byUser.get(key)
    if (resolved === undefined) {
      // A name that would change a pattern's shape (wildcards, separators) gets no rights.
      resolved = !IDENTIFIER.test(user)
        ? []
        : this.rules
          .filter((r) => r.user === null || r.user === user)
          .map((r) => [r.access, r.topic.replaceAll('%u', user).replaceAll('%c', clientId)])
      this.byUser.set(key, resolved)
    }
    return resolved
  }

  allowed (user, clientId, topic, grants, match) {
    const rules = this.rulesFor(user, clientId)
    if (rules.some(([access, f]) => access === 'deny' && match(f, topic))) return false
    return rules.some(([access, f]) => grants.includes(access) && match(f, topic))
  }

  mayPublish (user, clientId, topic) {
    return this.allowed(user, clientId, topic, ['write', 'readwrite'], topicMatches)
  }

  mayRead (user, clientId, topic) {
    return this.allowed(user, clientId, topic, ['read', 'readwrite'], topicMatches)
  }

  maySubscribe (user, clientId, filter) {
    return this.allowed(user, clientId, filter, ['read', 'readwrite'], filterCovers)
  }
}

async function main () {
  const path = process.argv[2]
  if (!path) fail('usage: node broker.mjs NODE.json (written by `pear-mqtt broker render --flavor cluster`)')
  let conf
  try {
    conf = JSON.parse(readFileSync(path, 'utf8'))
  } catch (err) {
    fail(`cannot read ${path}: ${err.message}`)
  }
  const policy = new Policy(conf.rules)
  const redis = { host: conf.redis.host, port: conf.redis.port }
  // ioredis 5.8+ sends its CLIENT SETINFO handshake before the ready check (INFO), so a
  // SUBSCRIBE made while the bus connects can come first and the INFO is refused
  // ("Connection in subscriber mode"); the connection is then torn down with that subscribe
  // in it, and a CONNECT waiting for it never got its CONNACK (ioredis issue #2037). The bus
  // connections skip both: a local redis needs no INFO before use.
  const mq = redisEmitter({ ...redis, enableReadyCheck: false, disableClientInfo: true })
  // ioredis reconnects and resubscribes by itself after a lost connection; an 'error' nobody
  // listens to would end the broker.
  mq.state.on('error', (err) => console.error(`redis message bus: ${err.message}; reconnecting`))
  const persistence = redisPersistence({
    ...redis,
    // A persistent session keeps what arrives while its client is away; aedes's default of
    // 1,000 would drop the rest of a store's backlog.
    maxSessionDelivery: conf.max_session_delivery
  })
  const broker = await Aedes.createBroker({
    id: conf.id, mq, persistence, concurrency: 1000, queueLimit: 10000,
    maxClientsIdLength: 128, drainTimeout: 30000
  })
  const users = new WeakMap()

  broker.authenticate = (client, username, password, done) => {
    // The certificate's CN is the client's identity (mosquitto's use_identity_as_username).
    const cert = client.conn.getPeerCertificate ? client.conn.getPeerCertificate() : null
    const cn = cert && cert.subject ? cert.subject.CN : undefined
    if (typeof cn !== 'string' || !IDENTIFIER.test(cn)) {
      const err = new Error('no usable client certificate CN')
      err.returnCode = 5
      return done(err, false)
    }
    users.set(client, cn)
    done(null, true)
  }
  broker.authorizePublish = (client, packet, done) => {
    if (client === null) return done(null) // a will published for a client already gone
    const user = users.get(client)
    if (packet.topic.startsWith('$SYS') || !policy.mayPublish(user, client.id, packet.topic)) {
      return done(new Error(`publish to ${packet.topic} refused by the ACL`))
    }
    done(null)
  }
  broker.authorizeSubscribe = (client, sub, done) => {
    const user = users.get(client)
    done(null, policy.maySubscribe(user, client.id, sub.topic) ? sub : null)
  }
  broker.authorizeForward = (client, packet) => {
    const user = users.get(client)
    return user !== undefined && policy.mayRead(user, client.id, packet.topic) ? packet : null
  }
  broker.on('clientError', (client, err) => {
    process.stderr.write(`client ${client ? client.id : '?'}: ${err.message}\n`)
  })

  const tlsOptions = {
    key: readFileSync(conf.tls.key), cert: readFileSync(conf.tls.cert),
    ca: readFileSync(conf.tls.ca), requestCert: true, rejectUnauthorized: true,
    minVersion: 'TLSv1.2'
  }
  if (conf.tls.crl) tlsOptions.crl = readFileSync(conf.tls.crl)
  const server = createServer(tlsOptions, broker.handle)
  server.on('tlsClientError', () => {}) // a refused handshake is the client's error to see
  server.listen(conf.port, conf.host, () => {
    process.stdout.write(`pear cluster broker ${conf.id} listening on ${conf.host}:${conf.port}\n`)
  })
  server.on('error', (err) => fail(`${conf.host}:${conf.port}: ${err.message}`))
  const stop = () => {
    server.close()
    broker.close(() => process.exit(0))
  }
  process.on('SIGTERM', stop)
  process.on('SIGINT', stop)
}

main().catch((err) => fail(err.stack || String(err)))
