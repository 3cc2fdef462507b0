#!/usr/bin/env ruby
# frozen_string_literal: true

# fanout reference consumer in Ruby (redis-rb; Debian: ruby-redis).
#
# Reads every shard stream <prefix>:{<tag>}:stream:<n>, n = 0..shards-1 (queue format 3:
# <tag> is the shard's hash tag, shard_tag below, as docs/queue-format.md defines it), as
# one consumer of a consumer group,
# hands each notification to handle, and only then acknowledges it. Entries that another
# consumer of the group left pending for --min-idle-ms (it died, or hangs) are taken over
# with XAUTOCLAIM. Duplicates are dropped by the notification's `id` (<event>:<recipient>)
# through a mark in Redis shared by the group's consumers, <prefix>:seen:<group>:<id>:
# claimed with SET NX PX <min-idle> before handling, set to "done" with an expiry
# (--seen-ttl) after handling. A consumer that takes over drops what the dead one had done.
#
# A compact entry (fields event and recipient only, fanoutd's default) becomes the full
# notification first: its event's body is read once from HGET <stream>:bodies <event> and
# kept in a small per-event cache (Bodies), so handle sees the same fields in either layout.
#
# With --cluster the streams are read from a Redis Cluster (redis-rb's cluster mode, seeded
# by --host/--port) under the same keys. The streams and
# marks live on different nodes, so each stream is read on its own and the marks are set one
# command each rather than pipelined.
#
# Runs until SIGTERM or SIGINT, which finish the batch in hand first. Prints one JSON line
# per handled notification (the payload parsed); replace handle with your own work.
#
#   consumer.rb --port 6379 --group mailer --consumer mailer-1

require 'json'
require 'set'
require 'optparse'
require 'redis'

# Your work goes here. This one prints the notification as one JSON line.
def handle(note)
  $stdout.write(JSON.generate(note.merge('payload' => JSON.parse(note['payload']))) + "\n")
  $stdout.flush
end

# Event bodies of compact entries, per stream and event; the newest SIZE kept (a Hash keeps
# insertion order, so its first key is the oldest).
class Bodies
  SIZE = 256

  def initialize(redis)
    @r = redis
    @cache = {}
    @missing = Set.new # [stream, event] pairs already named
  end

  # {"author":..,"kind":..,"created_at":..,"payload":<raw JSON>}: the payload is last, raw.
  def self.parse(body)
    at = body.index(',"payload":')
    meta = JSON.parse(body[0...at] + '}')
    [meta['author'], meta['kind'], meta['created_at'], body[(at + 11)...-1]]
  end

  # entries with every compact one replaced by the full notification's fields, in its order.
  # The entries of an event whose body is missing are left out, so they stay pending while
  # the rest of the batch is handled (a bad event fails alone), and it is named once.
  def full(key, entries)
    evs = entries.map { |_, f| f['event'] if f && !f.key?('payload') }.compact.uniq
    have = evs.select { |ev| @cache.key?([key, ev]) }.to_h { |ev| [ev, @cache[[key, ev]]] }
    want = evs.reject { |ev| have.key?(ev) }
    unless want.empty?
      @r.hmget("#{key}:bodies", *want).zip(want).each do |body, ev|
        if body
          have[ev] = Bodies.parse(body)
        elsif !@missing.include?([key, ev])
          @missing.clear if @missing.size >= 4096
          @missing << [key, ev]
          warn "consumer: #{key}:bodies has no body for event #{ev}: its entries stay " \
               'pending; fanoutd keeps a body while entries refer to it, so restore it or ' \
               'XACK them'
        end
      end
    end
    out = entries.filter_map do |id, f|
      next [id, f] if f.nil? || f.key?('payload') || !f['event']
      next nil unless have.key?(f['event']) # left pending

      author, kind, created, payload = have[f['event']]
      [id, { 'id' => "#{f['event']}:#{f['recipient']}", 'event' => f['event'], 'author' => author,
             'recipient' => f['recipient'], 'kind' => kind, 'payload' => payload,
             'created_at' => created }]
    end
    # cached only now, each used one moved to the newest end: evicting while the batch was
    # mapped could drop a body it needs
    have.each do |ev, b|
      @cache.delete([key, ev])
      @cache[[key, ev]] = b
    end
    @cache.delete(@cache.first[0]) while @cache.size > SIZE
    out
  end
end

# Shard n's hash tag: "<n>.<k>" for the smallest k whose slot is within
# max(1, 16384 / (8 shards)) of the shard's centre slot (docs/redis-cluster.md).
def shard_tag(n, shards)
  centre = (2 * n + 1) * 16_384 / (2 * shards)
  half = [1, 16_384 / (8 * shards)].max
  k = 0
  k += 1 while (Redis::Cluster::KeySlotConverter.convert("#{n}.#{k}") - centre).abs > half
  "#{n}.#{k}"
end

class Consumer
  attr_reader :handled

  def initialize(opts)
    @o = opts
    if opts[:cluster]
      @r = Redis.new(cluster: ["redis://#{opts[:host]}:#{opts[:port]}"], password: opts[:password])
    else
      @r = Redis.new(host: opts[:host], port: opts[:port], password: opts[:password])
    end
    @keys = (0...opts[:shards]).map do |n|
      "#{opts[:prefix]}:{#{shard_tag(n, opts[:shards])}}:stream:#{n}"
    end
    @handled = 0
    @claim = "claim:#{opts[:consumer]}"
    @bodies = Bodies.new(@r)
    @stop = false
  end

  def stop!
    @stop = true
  end

  def seen_key(id)
    "#{@o[:prefix]}:seen:#{@o[:group]}:#{id}"
  end

  def create_groups
    @keys.each do |key|
      @r.xgroup(:create, key, @o[:group], '0', mkstream: true)
    rescue Redis::CommandError => e
      raise unless e.message.include?('BUSYGROUP')
    end
  end

  # One batch of one stream (see docs/queue-format.md, "Consumers"): claim each
  # notification's mark, handle what is ours, mark it done, acknowledge.
  def process(key, entries)
    return if entries.empty?

    entries = @bodies.full(key, entries)
    live = entries.select { |_, f| f && f['id'] }
    claimed = claim_marks(live) # claim: one consumer at a time handles a notification
    others = live.zip(claimed).reject { |_, ok| ok }.map { |(_, f), _| f['id'] }
    marks = others.empty? ? {} : others.zip(read_marks(others)).to_h
    ack = []
    done_here = 0
    entries.each do |id, f|
      mark = f && f['id'] ? marks.fetch(f['id'], @claim) : @claim
      if mark != @claim
        ack << id if mark == 'done' # handled before (by a consumer that died): drop it
        next # else another live consumer is handling it and will acknowledge it
      end
      if f # (an entry deleted from the stream meanwhile is only acknowledged)
        handle(f)
        @r.set(seen_key(f['id']), 'done', ex: @o[:seen_ttl]) if f['id']
        @handled += 1
        done_here += 1
        stall(entries.size, done_here) if @o[:stall_after].positive? && @handled >= @o[:stall_after]
      end
      ack << id
    end
    @r.xack(key, @o[:group], *ack) unless ack.empty?
  end

  # On a cluster the marks are in many slots: one command each.
  def claim_marks(live)
    set = ->(r, f) { r.set(seen_key(f['id']), @claim, nx: true, px: @o[:min_idle_ms]) }
    return live.map { |_, f| set.call(@r, f) } if @o[:cluster]

    @r.pipelined { |pipe| live.each { |_, f| set.call(pipe, f) } }
  end

  def read_marks(ids)
    return ids.map { |i| @r.get(seen_key(i)) } if @o[:cluster]

    @r.mget(*ids.map { |i| seen_key(i) })
  end

  # Test aid: a crash while holding unacknowledged entries (see --stall-after).
  def stall(held, handled_here)
    warn "stalled after #{@handled}: holding #{held} unacknowledged entries, " \
         "#{handled_here} of them handled"
    $stderr.flush
    sleep
  end

  # Takes over entries idle for min-idle-ms in any consumer's hands.
  def sweep
    @keys.each do |key|
      start = '0-0'
      until @stop
        got = @r.xautoclaim(key, @o[:group], @o[:consumer], @o[:min_idle_ms], start,
                            count: @o[:count])
        process(key, got['entries'])
        start = got['next']
        break if start == '0-0'
      end
    end
  end

  def run
    create_groups
    every = (@o[:min_idle_ms] / 2000.0).clamp(0.01, 1.0)
    last_sweep = -every
    until @stop
      now = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      if now - last_sweep >= every
        sweep
        last_sweep = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      end
      block = [@o[:block_ms], (every * 1000).to_i].min.clamp(1, nil)
      got = read(block)
      got.each { |key, entries| process(key, entries) }
    end
  end

  private

  def read(block)
    unless @o[:cluster]
      return @r.xreadgroup(@o[:group], @o[:consumer], @keys, ['>'] * @keys.size,
                           count: @o[:count], block: block)
    end

    got = {} # one stream per read: they are in different slots
    @keys.each do |key|
      got.merge!(@r.xreadgroup(@o[:group], @o[:consumer], key, '>', count: @o[:count]))
    end
    sleep(block / 1000.0) if got.empty?
    got
  end
end

opts = { host: '127.0.0.1', port: 6379, password: nil, prefix: 'fanout', shards: 16,
         count: 100, block_ms: 1000, min_idle_ms: 60_000, seen_ttl: 86_400, stall_after: 0 }
parser = OptionParser.new do |p|
  p.banner = 'usage: consumer.rb --group G --consumer C [options]'
  p.on('--host H') { |v| opts[:host] = v }
  p.on('--port N', Integer) { |v| opts[:port] = v }
  p.on('--password P') { |v| opts[:password] = v }
  p.on('--cluster', 'read from a Redis Cluster (--host/--port: any node of it)') { opts[:cluster] = true }
  p.on('--prefix P', 'FANOUT_KEY_PREFIX') { |v| opts[:prefix] = v }
  p.on('--shards N', Integer, 'FANOUT_SHARDS') { |v| opts[:shards] = v }
  p.on('--group G') { |v| opts[:group] = v }
  p.on('--consumer C') { |v| opts[:consumer] = v }
  p.on('--count N', Integer, 'entries per read') { |v| opts[:count] = v }
  p.on('--block-ms N', Integer) { |v| opts[:block_ms] = v }
  p.on('--min-idle-ms N', Integer, 'take over entries pending this long') { |v| opts[:min_idle_ms] = v }
  p.on('--seen-ttl S', Integer, "dedupe marks' expiry") { |v| opts[:seen_ttl] = v }
  p.on('--stall-after N', Integer, 'for tests: hold the batch after N') { |v| opts[:stall_after] = v }
end
begin
  parser.parse!
rescue OptionParser::ParseError => e
  warn "consumer.rb: #{e.message}; see consumer.rb --help"
  exit 2
end
unless opts[:group] && opts[:consumer]
  warn 'consumer.rb: --group and --consumer are required'
  exit 2
end

consumer = Consumer.new(opts)
%w[TERM INT].each { |sig| Signal.trap(sig) { consumer.stop! } }
consumer.run
warn "handled #{consumer.handled}"
