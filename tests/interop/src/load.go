package main

// The "load" subcommand: a load generator made of real Tailscale clients.
//
// N sender→receiver pairs, each side its own derphttp.Client (the region client tailscaled
// uses, node pinned by its sha256-raw CertName), push fixed-size packets through one relay
// at a fixed offered rate. derphttp writes every Send as its own DERP frame, TLS record and
// write(2), and reads each frame as it arrives, so the relay sees the per-packet traffic of
// real clients (derp-bench, our own generator, coalesces records; this does not).
//
// Pacing: each sender owns rate/pairs of the offered rate, wakes on a short timer and sends
// what is due since its start (one Send per packet, as a WireGuard packet would be). Every
// packet carries the pair, a sequence number and its send time (monotonic nanoseconds of
// this process), so the receiver measures one-way latency and loss without any clock sync.
//
// A trial: warm-up, then a measured window; only packets sent inside the window count.
// After the window the receivers get a grace period for packets still in flight; a packet
// not received by then is lost. Over the window the relay's CPU (utime+stime of
// /proc/PID/stat), its context switches (voluntary and involuntary, summed over
// /proc/PID/task/*/status) and, with -perf, its system calls (perf stat -e
// raw_syscalls:sys_enter attached to the relay for exactly the window) are read, each
// divided by delivered packets.
//
// Capacity mode (-capacity) runs trials at rising offered rates (×1.5 from -rate) until a
// trial loses more than -max-loss percent or the generator cannot send what is offered,
// then bisects between the last good and the first bad rate; the capacity is the highest
// offered rate whose trial met the bar.

import (
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"tailscale.com/derp"
)

const (
	loadMagic  = "KDL1"
	loadHeader = len(loadMagic) + 1 + 4 + 4 + 8 // magic, kind, pair, seq, send time (ns)
	kindProbe  = 'p'
	kindLoad   = 'l'
	// Latency samples kept per trial (uniform subsample beyond this).
	maxLatSamples = 1 << 20
)

var loadStart = time.Now()

func nowNs() int64 { return int64(time.Since(loadStart)) }

type loadFlags struct {
	pairs    int
	size     int
	rate     float64
	warmup   time.Duration
	duration time.Duration
	grace    time.Duration
	tick     time.Duration
	pid      int
	perf     string
	capacity bool
	maxLoss  float64
	maxRate  float64
	steps    int
	minSent  float64
}

// loadPair is one sender→receiver pair.
type loadPair struct {
	idx      int
	src, dst *peer
	ready    atomic.Bool // the receiver got a probe
	recvErr  atomic.Value
	// Per-trial receive state, written by the receiver goroutine only while a trial runs.
	mu      sync.Mutex
	lo, hi  int64 // window [lo, hi) of send times, ns
	recv    int64
	lat     []int64
	latSeen int64
	dups    int64
}

// trial is the outcome of one offered rate.
type trial struct {
	OfferedPPS      float64            `json:"offered_pps"`
	SentPPS         float64            `json:"sent_pps"`
	DeliveredPPS    float64            `json:"delivered_pps"`
	Sent            int64              `json:"sent"`
	Received        int64              `json:"received"`
	LossPct         float64            `json:"loss_pct"`
	Gbit            float64            `json:"gbit_s"`
	Latency         map[string]float64 `json:"latency"`
	ServerCPUs      float64            `json:"server_cpu_s"`
	ServerUtil      float64            `json:"server_util"`
	ServerCPUUs     float64            `json:"server_cpu_us_per_pkt"`
	ClientUtil      float64            `json:"client_util"`
	ClientBound     bool               `json:"client_bound"`
	CtxVoluntary    int64              `json:"ctx_voluntary"`
	CtxInvoluntary  int64              `json:"ctx_involuntary"`
	CtxPerPkt       float64            `json:"ctx_switches_per_pkt"`
	Syscalls        int64              `json:"syscalls,omitempty"`
	SyscallsPerPkt  float64            `json:"syscalls_per_pkt,omitempty"`
	SyscallSource   string             `json:"syscall_source,omitempty"`
	PerfError       string             `json:"perf_error,omitempty"`
	ServerThreads   int                `json:"server_threads"`
	WindowS         float64            `json:"window_s"`
	MetBar          bool               `json:"met_bar"`
	ReceiverErrors  []string           `json:"receiver_errors,omitempty"`
	DuplicateOrLate int64              `json:"duplicates"`
}

type loadResult struct {
	OK               bool     `json:"ok"`
	Subcommand       string   `json:"subcommand"`
	TailscaleVersion string   `json:"tailscale_version"`
	GoVersion        string   `json:"go_version"`
	Transport        string   `json:"transport"`
	TLSVersion       string   `json:"tls_version"`
	Pairs            int      `json:"pairs"`
	Size             int      `json:"size"`
	Mode             string   `json:"mode"` // "rate" or "capacity"
	MaxLossPct       float64  `json:"max_loss_pct,omitempty"`
	CapacityPPS      *float64 `json:"capacity_pps,omitempty"`
	Trials           []trial  `json:"trials"`
	// The fixed-rate trial, or in capacity mode the trial at the capacity (the fields the
	// bench reads), flattened.
	trial
}

func runLoad(args []string) int {
	fs := flag.NewFlagSet("load", flag.ContinueOnError)
	cf := addCommonFlags(fs)
	var lf loadFlags
	fs.IntVar(&lf.pairs, "pairs", 16, "sender→receiver pairs (two clients each)")
	fs.IntVar(&lf.size, "size", 1312, "payload bytes per packet (>= 21)")
	fs.Float64Var(&lf.rate, "rate", 20000, "offered packets/s over all pairs (capacity mode: the first rate tried)")
	fs.DurationVar(&lf.warmup, "warmup", time.Second, "load before the measured window")
	fs.DurationVar(&lf.duration, "duration", 4*time.Second, "measured window")
	fs.DurationVar(&lf.grace, "grace", 300*time.Millisecond, "wait after the window for packets in flight")
	fs.DurationVar(&lf.tick, "tick", 500*time.Microsecond, "sender pacing interval")
	fs.IntVar(&lf.pid, "server-pid", 0, "relay process: CPU, context switches (and with -perf system calls) over the window")
	fs.StringVar(&lf.perf, "perf", "", "perf binary: count the relay's system calls with perf stat -e raw_syscalls:sys_enter")
	fs.BoolVar(&lf.capacity, "capacity", false, "search the highest offered rate with loss <= -max-loss")
	fs.Float64Var(&lf.maxLoss, "max-loss", 0.1, "capacity bar: loss in percent")
	fs.Float64Var(&lf.maxRate, "max-rate", 2e6, "capacity mode: never offer more than this")
	fs.IntVar(&lf.steps, "steps", 4, "capacity mode: bisection steps after the first failing rate")
	fs.Float64Var(&lf.minSent, "min-sent", 0.98, "a trial meets the bar only if the generator sent at least this fraction of the offered rate")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if lf.pairs < 1 || lf.size < loadHeader || lf.size > derp.MaxPacketSize || lf.rate <= 0 || lf.duration <= 0 {
		return fail("load", "setup", fmt.Errorf("need -pairs >= 1, %d <= -size <= %d, -rate > 0, -duration > 0", loadHeader, derp.MaxPacketSize))
	}
	s, err := prepare("load", cf)
	if err != nil {
		return fail("load", "setup", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), s.timeout)
	defer cancel()
	pairs, stage, err := connectPairs(ctx, s, lf.pairs)
	defer func() {
		for _, p := range pairs {
			closePeers(p.src, p.dst)
		}
	}()
	if err != nil {
		return fail("load", stage, err)
	}
	res := loadResult{Subcommand: "load", TailscaleVersion: tailscaleVersion(), GoVersion: goVersion(),
		Transport: pairs[0].src.info.Transport, TLSVersion: pairs[0].src.info.TLSVersion,
		Pairs: lf.pairs, Size: lf.size, Mode: "rate"}
	if !lf.capacity {
		t, err := runTrial(ctx, pairs, &lf, lf.rate)
		if err != nil {
			return fail("load", "trial", err)
		}
		res.Trials = []trial{t}
		res.trial = t
	} else {
		res.Mode = "capacity"
		res.MaxLossPct = lf.maxLoss
		best, trials, err := searchCapacity(ctx, pairs, &lf)
		res.Trials = trials
		if err != nil {
			return fail("load", "capacity", err)
		}
		if best != nil {
			c := best.OfferedPPS
			res.CapacityPPS = &c
			res.trial = *best
		}
	}
	res.OK = true
	emit(res)
	return 0
}

// connectPairs connects every client (receivers first), starts the receive loops and
// makes sure each receiver is registered and reachable from its sender.
func connectPairs(ctx context.Context, s *setup, n int) ([]*loadPair, string, error) {
	pairs := make([]*loadPair, n)
	for i := range pairs {
		lp := &loadPair{idx: i}
		var err error
		if lp.dst, err = s.newPeer(fmt.Sprintf("r%d", i), s.nodeB); err != nil {
			return pairs[:i], "client", err
		}
		if lp.src, err = s.newPeer(fmt.Sprintf("s%d", i), s.nodeA); err != nil {
			return pairs[:i], "client", err
		}
		pairs[i] = lp
		for _, p := range []*peer{lp.dst, lp.src} {
			if err := s.connectClient(ctx, p); err != nil {
				return pairs[:i+1], "connect-" + p.label, err
			}
		}
		go lp.receive()
		go lp.drainSender()
	}
	// Probe each pair until its receiver has seen a packet from its sender.
	for _, lp := range pairs {
		for sends := 0; !lp.ready.Load(); sends++ {
			if e := lp.recvErr.Load(); e != nil {
				return pairs, "probe", e.(error)
			}
			if sends%20 == 0 {
				pkt := make([]byte, loadHeader)
				stamp(pkt, kindProbe, lp.idx, 0, 0)
				if err := lp.src.c.Send(lp.dst.priv.Public(), pkt); err != nil {
					return pairs, "probe", err
				}
			}
			select {
			case <-ctx.Done():
				return pairs, "probe", fmt.Errorf("pair %d: no probe delivered: %w", lp.idx, ctx.Err())
			case <-time.After(5 * time.Millisecond):
			}
		}
	}
	return pairs, "", nil
}

func stamp(b []byte, kind byte, pair int, seq uint32, t int64) {
	copy(b, loadMagic)
	b[4] = kind
	binary.BigEndian.PutUint32(b[5:], uint32(pair))
	binary.BigEndian.PutUint32(b[9:], seq)
	binary.BigEndian.PutUint64(b[13:], uint64(t))
}

// receive runs the receiver's read loop for the life of the process.
func (lp *loadPair) receive() {
	src := lp.src.priv.Public()
	for {
		m, err := lp.dst.c.Recv()
		if err != nil {
			lp.recvErr.Store(fmt.Errorf("receiver %d: %w", lp.idx, err))
			return
		}
		pkt, ok := m.(derp.ReceivedPacket)
		if !ok || pkt.Source != src || len(pkt.Data) < loadHeader || string(pkt.Data[:4]) != loadMagic {
			continue
		}
		switch pkt.Data[4] {
		case kindProbe:
			lp.ready.Store(true)
		case kindLoad:
			t := int64(binary.BigEndian.Uint64(pkt.Data[13:]))
			now := nowNs()
			lp.mu.Lock()
			if t >= lp.lo && t < lp.hi {
				lp.recv++
				lp.latSeen++
				if len(lp.lat) < cap(lp.lat) {
					lp.lat = append(lp.lat, now-t)
				} else if cap(lp.lat) > 0 {
					// Reservoir sampling keeps the sample uniform.
					if j := int64(fastrand() % uint64(lp.latSeen)); j < int64(len(lp.lat)) {
						lp.lat[j] = now - t
					}
				}
			}
			lp.mu.Unlock()
		}
	}
}

var rngState atomic.Uint64

func fastrand() uint64 {
	x := rngState.Add(0x9E3779B97F4A7C15)
	x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9
	x = (x ^ (x >> 27)) * 0x94D049BB133111EB
	return x ^ (x >> 31)
}

// drainSender reads (and drops) what the relay sends the sender (keepalives, pongs), as
// tailscaled's receive loop would: a client that never reads would stall its connection.
func (lp *loadPair) drainSender() {
	for {
		if _, err := lp.src.c.Recv(); err != nil {
			return
		}
	}
}

// runTrial offers rate packets/s for warmup+duration and measures the window.
func runTrial(ctx context.Context, pairs []*loadPair, lf *loadFlags, rate float64) (trial, error) {
	t := trial{OfferedPPS: rate}
	start := nowNs()
	lo := start + int64(lf.warmup)
	hi := lo + int64(lf.duration)
	perPair := lf.maxSamplesPerPair()
	for _, lp := range pairs {
		lp.mu.Lock()
		lp.lo, lp.hi, lp.recv, lp.latSeen = lo, hi, 0, 0
		lp.lat = make([]int64, 0, perPair)
		lp.mu.Unlock()
	}
	var sentWin atomic.Int64
	var wg sync.WaitGroup
	errc := make(chan error, len(pairs))
	per := rate / float64(len(pairs))
	for _, lp := range pairs {
		wg.Add(1)
		go func(lp *loadPair) {
			defer wg.Done()
			n, err := lp.send(ctx, lf, per, start, lo, hi)
			sentWin.Add(n)
			if err != nil {
				errc <- err
			}
		}(lp)
	}
	// Sample the relay and ourselves at the window's edges.
	sleepUntil(lo)
	before := sampleServer(lf.pid)
	clientBefore := selfCPU()
	var perf *perfStat
	if lf.perf != "" && lf.pid > 0 {
		perf = startPerf(lf.perf, lf.pid)
	}
	sleepUntil(hi)
	after := sampleServer(lf.pid)
	clientAfter := selfCPU()
	if perf != nil {
		n, err := perf.stop()
		if err != nil {
			t.PerfError = err.Error()
		} else {
			t.Syscalls = n
			t.SyscallSource = "perf stat -e raw_syscalls:sys_enter -p PID (all threads of the relay, window only)"
		}
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		return t, err
	}
	time.Sleep(lf.grace)
	var lat []int64
	for _, lp := range pairs {
		lp.mu.Lock()
		t.Received += lp.recv
		lat = append(lat, lp.lat...)
		lp.lo, lp.hi = math.MaxInt64, math.MaxInt64 // late packets of this trial do not count in the next
		lp.lat = nil
		lp.mu.Unlock()
		if e := lp.recvErr.Load(); e != nil {
			t.ReceiverErrors = append(t.ReceiverErrors, e.(error).Error())
		}
	}
	if len(t.ReceiverErrors) > 0 {
		return t, errors.New(strings.Join(t.ReceiverErrors, "; "))
	}
	w := lf.duration.Seconds()
	t.WindowS = w
	t.Sent = sentWin.Load()
	t.SentPPS = float64(t.Sent) / w
	t.DeliveredPPS = float64(t.Received) / w
	if t.Sent > 0 {
		t.LossPct = 100 * float64(t.Sent-t.Received) / float64(t.Sent)
	}
	t.Gbit = t.DeliveredPPS * float64(lf.size) * 8 / 1e9
	t.Latency = percentilesUs(lat)
	t.ClientUtil = (clientAfter - clientBefore) / w
	// The generator's own core is the limit when it is (nearly) busy or cannot send what
	// is offered: then a relay's numbers are a lower bound.
	t.ClientBound = t.ClientUtil > 0.85 || t.SentPPS < 0.98*rate
	if lf.pid > 0 && before.ok && after.ok {
		t.ServerCPUs = after.cpu - before.cpu
		t.ServerUtil = t.ServerCPUs / w
		t.CtxVoluntary = after.vol - before.vol
		t.CtxInvoluntary = after.invol - before.invol
		t.ServerThreads = after.threads
		if t.Received > 0 {
			t.ServerCPUUs = 1e6 * t.ServerCPUs / float64(t.Received)
			t.CtxPerPkt = float64(t.CtxVoluntary+t.CtxInvoluntary) / float64(t.Received)
			if t.Syscalls > 0 {
				t.SyscallsPerPkt = float64(t.Syscalls) / float64(t.Received)
			}
		}
	}
	t.MetBar = t.LossPct <= lf.maxLoss && t.SentPPS >= lf.minSent*rate
	return t, nil
}

func (lf *loadFlags) maxSamplesPerPair() int {
	return max(1024, maxLatSamples/lf.pairs)
}

// send paces one sender at per packets/s from start until hi; returns the packets sent
// inside [lo, hi).
func (lp *loadPair) send(ctx context.Context, lf *loadFlags, per float64, start, lo, hi int64) (int64, error) {
	dst := lp.dst.priv.Public()
	buf := make([]byte, lf.size)
	for i := loadHeader; i < len(buf); i++ {
		buf[i] = byte(i)
	}
	interval := 1e9 / per // ns between packets
	var done, inWin int64
	var seq uint32
	for {
		now := nowNs()
		if now >= hi {
			return inWin, nil
		}
		due := int64(float64(now-start) / interval)
		for ; done < due; done++ {
			t := nowNs()
			if t >= hi {
				return inWin, nil
			}
			seq++
			stamp(buf, kindLoad, lp.idx, seq, t)
			if err := lp.src.c.Send(dst, buf); err != nil {
				return inWin, fmt.Errorf("sender %d: %w", lp.idx, err)
			}
			if t >= lo {
				inWin++
			}
		}
		if ctx.Err() != nil {
			return inWin, ctx.Err()
		}
		next := start + int64(float64(done+1)*interval)
		sleepUntil(min(next, now+int64(lf.tick), hi))
	}
}

func sleepUntil(t int64) {
	if d := t - nowNs(); d > 0 {
		time.Sleep(time.Duration(d))
	}
}

func percentilesUs(xs []int64) map[string]float64 {
	out := map[string]float64{"samples": float64(len(xs))}
	if len(xs) == 0 {
		return out
	}
	sort.Slice(xs, func(i, j int) bool { return xs[i] < xs[j] })
	q := func(p float64) float64 {
		i := int(math.Ceil(p*float64(len(xs)))) - 1
		i = max(0, min(i, len(xs)-1))
		return float64(xs[i]) / 1e3
	}
	out["p50_us"] = q(0.50)
	out["p90_us"] = q(0.90)
	out["p99_us"] = q(0.99)
	out["p999_us"] = q(0.999)
	out["max_us"] = float64(xs[len(xs)-1]) / 1e3
	return out
}

// searchCapacity: rates rise by 1.5× until a trial fails the bar, then bisection.
func searchCapacity(ctx context.Context, pairs []*loadPair, lf *loadFlags) (*trial, []trial, error) {
	var trials []trial
	var best *trial
	good, bad := 0.0, 0.0
	rate := lf.rate
	for rate <= lf.maxRate {
		t, err := runTrial(ctx, pairs, lf, rate)
		if err != nil {
			return best, trials, err
		}
		trials = append(trials, t)
		logf("capacity: offered %.0f sent %.0f delivered %.0f loss %.3f%% server_util %.2f client_util %.2f",
			rate, t.SentPPS, t.DeliveredPPS, t.LossPct, t.ServerUtil, t.ClientUtil)
		if !t.MetBar {
			bad = rate
			break
		}
		tt := t
		best, good = &tt, rate
		rate *= 1.5
	}
	for i := 0; i < lf.steps && bad > 0 && good > 0 && bad/good > 1.05; i++ {
		mid := (good + bad) / 2
		t, err := runTrial(ctx, pairs, lf, mid)
		if err != nil {
			return best, trials, err
		}
		trials = append(trials, t)
		logf("capacity: offered %.0f sent %.0f delivered %.0f loss %.3f%% server_util %.2f client_util %.2f",
			mid, t.SentPPS, t.DeliveredPPS, t.LossPct, t.ServerUtil, t.ClientUtil)
		if t.MetBar {
			tt := t
			best, good = &tt, mid
		} else {
			bad = mid
		}
	}
	return best, trials, nil
}

// serverSample is what /proc says about the relay at one instant.
type serverSample struct {
	ok         bool
	cpu        float64 // utime+stime, seconds (all threads, including exited ones)
	vol, invol int64   // context switches summed over live threads
	threads    int
}

// Linux USER_HZ, the unit of utime/stime in /proc/PID/stat (100 on every Linux ABI).
const userHZ = 100.0

func sampleServer(pid int) serverSample {
	var s serverSample
	if pid <= 0 {
		return s
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return s
	}
	// Fields after the parenthesised comm; utime and stime are fields 14 and 15.
	rest := string(b)
	if i := strings.LastIndexByte(rest, ')'); i >= 0 {
		rest = rest[i+1:]
	}
	f := strings.Fields(rest)
	if len(f) < 13 {
		return s
	}
	ut, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	s.cpu = (ut + st) / userHZ
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/status", pid))
	for _, t := range tasks {
		b, err := os.ReadFile(t)
		if err != nil {
			continue
		}
		s.threads++
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "voluntary_ctxt_switches:"); ok {
				n, _ := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
				s.vol += n
			} else if v, ok := strings.CutPrefix(line, "nonvoluntary_ctxt_switches:"); ok {
				n, _ := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
				s.invol += n
			}
		}
	}
	s.ok = true
	return s
}

// selfCPU is this process's CPU time in seconds.
func selfCPU() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
}

// perfStat is a running `perf stat` attached to the relay.
type perfStat struct {
	cmd *exec.Cmd
	out *strings.Builder
	err error
}

func startPerf(bin string, pid int) *perfStat {
	p := &perfStat{out: &strings.Builder{}}
	p.cmd = exec.Command(bin, "stat", "-x", ",", "-e", "raw_syscalls:sys_enter", "-p", strconv.Itoa(pid))
	p.cmd.Stderr = p.out
	if err := p.cmd.Start(); err != nil {
		p.err = err
	}
	return p
}

// stop ends perf stat (SIGINT makes it print its counts) and returns the syscall count.
func (p *perfStat) stop() (int64, error) {
	if p.err != nil {
		return 0, p.err
	}
	_ = p.cmd.Process.Signal(os.Interrupt)
	_ = p.cmd.Wait()
	for _, line := range strings.Split(p.out.String(), "\n") {
		f := strings.Split(line, ",")
		if len(f) >= 3 && strings.Contains(line, "raw_syscalls:sys_enter") {
			n, err := strconv.ParseInt(strings.TrimSpace(f[0]), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("perf stat: %q: %w", line, err)
			}
			return n, nil
		}
	}
	return 0, fmt.Errorf("perf stat printed no raw_syscalls count: %q", p.out.String())
}
