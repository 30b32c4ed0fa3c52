package main

// How the real derphttp client picks its transport (identical logic in v1.82.5 and v1.104.7,
// derp/derphttp/derphttp_client.go (*Client).connect), and how derpinterop drives each one:
//
//   - WebSocket: only when the package was compiled with the websocket dialer (GOOS=js, or
//     linux/darwin with build tag ts_debug_websockets; our build.sh always sets that tag) AND
//     the env knob TS_DEBUG_DERP_WS_CLIENT is true. Then the client calls
//     websocket.Dial(url, Subprotocols: ["derp"]) through http.DefaultClient (NOT through
//     tlsdial: no sha256-raw pinning on this path) and runs DERP over binary messages; fast
//     start and Ideal-Node do not exist there. The URL is the client's -URL for
//     derphttp.NewClient, or for a region client urlString(Nodes[0]) which is
//     "https://HostName/derp" in v1.82.5 (DERPPort ignored => port 443) and
//     "https://HostName:DERPPort/derp" from v1.100.0 on. So: v1.104.7 uses a region client,
//     v1.82.5 uses derphttp.NewClient("https://HostName:DERPPort/derp") (see compat.go).
//     Mode "websocket" sets the env knob and replaces http.DefaultTransport by one that dials
//     TLS with the same verification derphttp uses for the node (tlsdial's
//     SetConfigExpectedCertHash for a sha256-raw CertName, system roots otherwise), so the
//     pin is still enforced by Tailscale's own check.
//   - Fast start: chosen by the client, never by a knob: after the TLS handshake, if the
//     negotiated version is >= TLS 1.3 and parseMetaCert finds a certificate whose CN is
//     "derpkey<hex key>" with an 8-bit non-zero serial, the client sends Derp-Fast-Start: 1
//     and ClientInfo without reading any HTTP response. Mode "fast" uses the default
//     client config and then requires that those conditions held.
//   - Plain upgrade (HTTP 101): whenever fast start's conditions do not hold. Mode "upgrade"
//     uses the default config and requires that the server offered no fast start (e.g. our
//     relay in pinned mode sends no metacert). Mode "upgrade-tls12" forces the 101 path
//     against any server through the public Client.TLSConfig field (MaxVersion TLS 1.2:
//     the metacert is only looked at on TLS 1.3 connections).
//
// The transport actually taken is reported per connection: "websocket" if the client's
// WebSocket dialer logged its connection, otherwise "fast-start"/"upgrade" computed from
// the connection's TLS state with the same rule parseMetaCert applies.

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"go4.org/mem"
	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/net/tlsdial"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
)

type commonFlags struct {
	derpMap *string
	region  *int
	nodeA   *string
	nodeB   *string
	mode    *string
	timeout *time.Duration
	caFile  *string
}

func addCommonFlags(fs *flag.FlagSet) *commonFlags {
	return &commonFlags{
		derpMap: fs.String("derpmap", "", "derpMap JSON file (tailcfg.DERPMap, decoded strictly)"),
		region:  fs.Int("region", 0, "region ID (default: the lowest region ID in the map)"),
		nodeA:   fs.String("node-a", "", "node name for client A (default: first DERP node of the region)"),
		nodeB:   fs.String("node-b", "", "node name for client B (default: same as A)"),
		mode:    fs.String("mode", "auto", "transport: fast | upgrade | upgrade-tls12 | websocket | auto (see exchange.go)"),
		timeout: fs.Duration("timeout", 30*time.Second, "overall time bound"),
		caFile:  fs.String("ca-file", "", "PEM roots to trust for nodes without a sha256-raw CertName (sets SSL_CERT_FILE)"),
	}
}

// connInfo describes one established client connection.
type connInfo struct {
	Node       string  `json:"node"`
	Transport  string  `json:"transport"`
	TLSVersion string  `json:"tls_version,omitempty"`
	PeerCerts  int     `json:"peer_certs"`
	MetaCert   bool    `json:"metacert"`
	ServerKey  string  `json:"server_key"`
	ClientKey  string  `json:"client_key"`
	URLMode    bool    `json:"url_mode"`
	ConnectMs  float64 `json:"connect_ms"`
	ServerInfo bool    `json:"server_info"`
}

type peer struct {
	label string
	priv  key.NodePrivate
	node  *tailcfg.DERPNode
	c     *derphttp.Client
	info  connInfo

	pkts       chan derp.ReceivedPacket
	gone       chan derp.PeerGoneMessage
	serverInfo chan struct{}
	recvErr    chan error
}

type setup struct {
	sub     string
	dm      *tailcfg.DERPMap
	region  *tailcfg.DERPRegion
	nodeA   *tailcfg.DERPNode
	nodeB   *tailcfg.DERPNode
	mode    string
	netMon  *netmon.Monitor
	timeout time.Duration
}

var validModes = map[string]bool{"auto": true, "fast": true, "upgrade": true, "upgrade-tls12": true, "websocket": true}

func prepare(sub string, cf *commonFlags) (*setup, error) {
	if *cf.derpMap == "" {
		return nil, errors.New("-derpmap is required")
	}
	if !validModes[*cf.mode] {
		return nil, fmt.Errorf("unknown -mode %q", *cf.mode)
	}
	if *cf.caFile != "" {
		setCAFile(*cf.caFile)
	}
	dm, err := loadDERPMap(*cf.derpMap)
	if err != nil {
		return nil, err
	}
	reg, err := pickRegion(dm, *cf.region)
	if err != nil {
		return nil, err
	}
	na, err := pickNode(reg, *cf.nodeA)
	if err != nil {
		return nil, err
	}
	nbName := *cf.nodeB
	if nbName == "" {
		nbName = na.Name
	}
	nb, err := pickNode(reg, nbName)
	if err != nil {
		return nil, err
	}
	s := &setup{sub: sub, dm: dm, region: reg, nodeA: na, nodeB: nb, mode: *cf.mode, netMon: netmon.NewStatic(), timeout: *cf.timeout}
	if s.mode == "websocket" {
		if err := os.Setenv("TS_DEBUG_DERP_WS_CLIENT", "1"); err != nil {
			return nil, err
		}
		installWebSocketTransport(reg.Nodes)
	}
	return s, nil
}

// setCAFile makes file the only system root pool. crypto/x509 reads SSL_CERT_FILE when the
// system pool is first loaded (lazily, at the first verification), so this is early enough.
func setCAFile(file string) {
	os.Setenv("SSL_CERT_FILE", file)
	os.Setenv("SSL_CERT_DIR", "/nonexistent")
}

// pinnedTLSConfig builds the TLS verification derphttp applies to node n
// ((*Client).tlsClient): ServerName = HostName; a "sha256-raw:" CertName goes through
// tlsdial.SetConfigExpectedCertHash of this very tailscale.com version; other CertNames
// are domain fronting (verify for CertName); empty = system roots for HostName.
func pinnedTLSConfig(n *tailcfg.DERPNode) *tls.Config {
	conf := &tls.Config{ServerName: n.HostName}
	if n.InsecureForTests {
		conf.InsecureSkipVerify = true
		return conf
	}
	if suf, ok := strings.CutPrefix(n.CertName, "sha256-raw:"); ok {
		tlsdial.SetConfigExpectedCertHash(conf, suf)
	} else if n.CertName != "" {
		conf.ServerName = n.CertName
	}
	return conf
}

// installWebSocketTransport replaces http.DefaultTransport (which the derphttp WebSocket
// dialer uses through http.DefaultClient) with one that verifies each node like derphttp's
// TCP path does. HTTP/2 stays off: WebSocket needs an HTTP/1.1 Upgrade.
func installWebSocketTransport(nodes []*tailcfg.DERPNode) {
	byAddr := map[string]*tailcfg.DERPNode{}
	for _, n := range nodes {
		port := n.DERPPort
		if port == 0 {
			port = 443
		}
		byAddr[net.JoinHostPort(n.HostName, strconv.Itoa(port))] = n
	}
	http.DefaultTransport = &http.Transport{
		DialTLSContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			n, ok := byAddr[addr]
			if !ok {
				return nil, fmt.Errorf("websocket dial to %s: not a node of the region", addr)
			}
			var d net.Dialer
			raw, err := d.DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			tc := tls.Client(raw, pinnedTLSConfig(n))
			if err := tc.HandshakeContext(ctx); err != nil {
				raw.Close()
				return nil, err
			}
			return tc, nil
		},
		ForceAttemptHTTP2: false,
	}
}

func (s *setup) newPeer(label string, n *tailcfg.DERPNode) (*peer, error) {
	p := &peer{
		label:      label,
		priv:       key.NewNode(),
		node:       n,
		pkts:       make(chan derp.ReceivedPacket, 256),
		gone:       make(chan derp.PeerGoneMessage, 16),
		serverInfo: make(chan struct{}),
		recvErr:    make(chan error, 1),
	}
	p.info.Node = n.Name
	p.info.ClientKey = p.priv.Public().String()
	plogf := func(format string, args ...any) { logf("["+label+"] "+format, args...) }
	reg := singleNodeRegion(s.region, n)
	if s.mode == "websocket" && !wsRegionDialHonoursDERPPort {
		port := n.DERPPort
		if port == 0 {
			port = 443
		}
		u := "https://" + net.JoinHostPort(n.HostName, strconv.Itoa(port)) + "/derp"
		c, err := derphttp.NewClient(p.priv, u, plogf, s.netMon)
		if err != nil {
			return nil, err
		}
		p.c = c
		p.info.URLMode = true
	} else {
		p.c = derphttp.NewRegionClient(p.priv, plogf, s.netMon, func() *tailcfg.DERPRegion { return reg })
	}
	if s.mode == "upgrade-tls12" {
		p.c.TLSConfig = &tls.Config{MaxVersion: tls.VersionTLS12}
	}
	return p, nil
}

// hasMetaCert applies derphttp's parseMetaCert rule.
func hasMetaCert(certs []*x509.Certificate) bool {
	for _, cert := range certs {
		if pubHex, ok := strings.CutPrefix(cert.Subject.CommonName, "derpkey"); ok {
			if _, err := key.ParseNodePublicUntyped(mem.S(pubHex)); err == nil && cert.SerialNumber.BitLen() <= 8 && cert.SerialNumber.Int64() != 0 {
				return true
			}
		}
	}
	return false
}

func tlsVersionName(v uint16) string {
	switch v {
	case tls.VersionTLS13:
		return "1.3"
	case tls.VersionTLS12:
		return "1.2"
	default:
		return fmt.Sprintf("0x%04x", v)
	}
}

func (s *setup) connect(ctx context.Context, p *peer) error {
	if err := s.connectClient(ctx, p); err != nil {
		return err
	}
	go p.recvLoop()
	return nil
}

// connectClient connects p's client and checks the transport it took; nothing reads from
// it yet.
func (s *setup) connectClient(ctx context.Context, p *peer) error {
	wsBefore := logWatch.websocketConnects()
	t0 := time.Now()
	if err := p.c.Connect(ctx); err != nil {
		return err
	}
	p.info.ConnectMs = ms(time.Since(t0))
	p.info.ServerKey = p.c.ServerPublicKey().String()
	if cs, ok := p.c.TLSConnectionState(); ok {
		p.info.TLSVersion = tlsVersionName(cs.Version)
		p.info.PeerCerts = len(cs.PeerCertificates)
		p.info.MetaCert = hasMetaCert(cs.PeerCertificates)
		if cs.Version >= tls.VersionTLS13 && p.info.MetaCert {
			p.info.Transport = "fast-start"
		} else {
			p.info.Transport = "upgrade"
		}
	} else if logWatch.websocketConnects() > wsBefore {
		p.info.Transport = "websocket"
	} else {
		p.info.Transport = "plain-http"
	}
	want := map[string]string{"fast": "fast-start", "upgrade": "upgrade", "upgrade-tls12": "upgrade", "websocket": "websocket"}[s.mode]
	if want != "" && p.info.Transport != want {
		why := ""
		switch {
		case s.mode == "fast" && p.info.TLSVersion != "1.3":
			why = " (TLS " + p.info.TLSVersion + ": fast start needs TLS 1.3)"
		case s.mode == "fast":
			why = " (the server presented no metacert, so the client cannot skip the 101)"
		case s.mode == "upgrade":
			why = " (the server presented a metacert over TLS 1.3, so the client always uses fast start; use -mode upgrade-tls12)"
		case s.mode == "websocket":
			why = " (binary built without the ts_debug_websockets tag?)"
		}
		return fmt.Errorf("mode %q requested but the client used %q%s", s.mode, p.info.Transport, why)
	}
	return nil
}

func (p *peer) recvLoop() {
	var once sync.Once
	for {
		m, err := p.c.Recv()
		if err != nil {
			p.recvErr <- err
			return
		}
		switch m := m.(type) {
		case derp.ServerInfoMessage:
			once.Do(func() { close(p.serverInfo) })
		case derp.ReceivedPacket:
			m.Data = bytes.Clone(m.Data)
			p.pkts <- m
		case derp.PeerGoneMessage:
			p.gone <- m
		}
	}
}

func (p *peer) waitServerInfo(ctx context.Context) error {
	select {
	case <-p.serverInfo:
		p.info.ServerInfo = true
		return nil
	case err := <-p.recvErr:
		return fmt.Errorf("%s: connection failed before ServerInfo: %w", p.label, err)
	case <-ctx.Done():
		return fmt.Errorf("%s: no ServerInfo frame: %w", p.label, ctx.Err())
	}
}

const (
	pktMagic   = "KDI1"
	kindHello  = 'h'
	kindData   = 'd'
	headerSize = len(pktMagic) + 1 + 4
)

// packetSizes cycles through small, MTU-ish, large and maximum (derp.MaxPacketSize) sizes.
var packetSizes = []int{64, 1280, 16 << 10, derp.MaxPacketSize}

func makePacket(kind byte, seq uint32, size int) []byte {
	if size < headerSize {
		size = headerSize
	}
	b := make([]byte, size)
	copy(b, pktMagic)
	b[len(pktMagic)] = kind
	binary.BigEndian.PutUint32(b[len(pktMagic)+1:], seq)
	rand.Read(b[headerSize:])
	return b
}

func packetKind(b []byte) byte {
	if len(b) < headerSize || string(b[:len(pktMagic)]) != pktMagic {
		return 0
	}
	return b[len(pktMagic)]
}

// hello makes sure dst is registered at the server and reachable from src: src resends a
// small hello packet every 100 ms until dst has received one (a packet sent before the
// server registered dst is dropped, as with any DERP server). Returns the number of sends.
func hello(ctx context.Context, src, dst *peer) (int, error) {
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	sends := 0
	for {
		sends++
		if err := src.c.Send(dst.priv.Public(), makePacket(kindHello, uint32(sends), 64)); err != nil {
			return sends, fmt.Errorf("%s->%s hello send: %w", src.label, dst.label, err)
		}
	wait:
		for {
			select {
			case m := <-dst.pkts:
				if m.Source == src.priv.Public() && packetKind(m.Data) == kindHello {
					return sends, nil
				}
			case err := <-dst.recvErr:
				return sends, fmt.Errorf("%s: recv: %w", dst.label, err)
			case err := <-src.recvErr:
				return sends, fmt.Errorf("%s: recv: %w", src.label, err)
			case <-tick.C:
				break wait
			case <-ctx.Done():
				return sends, fmt.Errorf("%s->%s: no hello delivered after %d sends: %w", src.label, dst.label, sends, ctx.Err())
			}
		}
	}
}

type dirStats struct {
	Sent     int `json:"sent"`
	Received int `json:"received"`
	Bytes    int `json:"bytes"`
}

// transfer sends count data packets src->dst one at a time, each awaited and compared
// byte for byte (no resends: a lost, corrupted, misattributed or reordered packet fails).
func transfer(ctx context.Context, src, dst *peer, count, maxSize int) (dirStats, error) {
	var st dirStats
	for i := 0; i < count; i++ {
		pkt := makePacket(kindData, uint32(i), min(packetSizes[i%len(packetSizes)], maxSize))
		if err := src.c.Send(dst.priv.Public(), pkt); err != nil {
			return st, fmt.Errorf("%s->%s send #%d: %w", src.label, dst.label, i, err)
		}
		st.Sent++
		for got := false; !got; {
			select {
			case m := <-dst.pkts:
				if packetKind(m.Data) == kindHello {
					continue // a late duplicate of the warm-up
				}
				if m.Source != src.priv.Public() {
					return st, fmt.Errorf("%s->%s #%d: packet attributed to %v, want %v", src.label, dst.label, i, m.Source.ShortString(), src.priv.Public().ShortString())
				}
				if !bytes.Equal(m.Data, pkt) {
					return st, fmt.Errorf("%s->%s #%d: payload mismatch (got %d bytes, want %d)", src.label, dst.label, i, len(m.Data), len(pkt))
				}
				st.Received++
				st.Bytes += len(pkt)
				got = true
			case err := <-dst.recvErr:
				return st, fmt.Errorf("%s: recv: %w", dst.label, err)
			case err := <-src.recvErr:
				return st, fmt.Errorf("%s (sender) lost its connection: %w", src.label, err)
			case <-ctx.Done():
				return st, fmt.Errorf("%s->%s #%d (%d bytes) not delivered: %w", src.label, dst.label, i, len(pkt), ctx.Err())
			}
		}
	}
	return st, nil
}

type exchangeResult struct {
	OK               bool      `json:"ok"`
	Subcommand       string    `json:"subcommand"`
	TailscaleVersion string    `json:"tailscale_version"`
	Mode             string    `json:"mode"`
	Region           int       `json:"region"`
	A                connInfo  `json:"a"`
	B                connInfo  `json:"b"`
	HelloSends       [2]int    `json:"hello_sends"`
	MaxSize          int       `json:"max_size,omitempty"`
	AToB             *dirStats `json:"a_to_b,omitempty"`
	BToA             *dirStats `json:"b_to_a,omitempty"`
	PeerGone         *goneInfo `json:"peer_gone,omitempty"`
	ElapsedMs        float64   `json:"elapsed_ms"`
}

type goneInfo struct {
	Peer       string  `json:"peer"`
	Reason     int     `json:"reason"`
	ReasonName string  `json:"reason_name"`
	AfterMs    float64 `json:"after_close_ms"`
}

// startPair creates and connects A and B and waits for both ServerInfo frames.
func (s *setup) startPair(ctx context.Context) (a, b *peer, stage string, err error) {
	if a, err = s.newPeer("a", s.nodeA); err != nil {
		return nil, nil, "client-a", err
	}
	if b, err = s.newPeer("b", s.nodeB); err != nil {
		return nil, nil, "client-b", err
	}
	if err := s.connect(ctx, a); err != nil {
		return a, b, "connect-a", err
	}
	if err := s.connect(ctx, b); err != nil {
		return a, b, "connect-b", err
	}
	if err := a.waitServerInfo(ctx); err != nil {
		return a, b, "serverinfo-a", err
	}
	if err := b.waitServerInfo(ctx); err != nil {
		return a, b, "serverinfo-b", err
	}
	return a, b, "", nil
}

func runExchange(args []string) int {
	fs := flag.NewFlagSet("exchange", flag.ContinueOnError)
	cf := addCommonFlags(fs)
	count := fs.Int("count", 8, "data packets per direction (sizes cycle 64, 1280, 16384, 65536 bytes, capped by -max-size)")
	maxSize := fs.Int("max-size", 0, "largest data packet (default 65536 = derp.MaxPacketSize; 16384 in websocket mode, see below)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	s, err := prepare("exchange", cf)
	if err != nil {
		return fail("exchange", "setup", err)
	}
	if *maxSize <= 0 {
		// Upstream derper reads WebSocket messages with coder/websocket's default limit of
		// 32768 bytes and drops the connection on a bigger one ("read limited at 32769
		// bytes"); a whole DERP frame travels in one message, so over WebSocket the default
		// stays well below that. Real WebSocket clients (browsers) send WireGuard-sized
		// packets.
		*maxSize = derp.MaxPacketSize
		if s.mode == "websocket" {
			*maxSize = 16 << 10
		}
	}
	res := exchangeResult{Subcommand: "exchange", TailscaleVersion: tailscaleVersion(), Mode: s.mode, Region: int(s.region.RegionID), MaxSize: *maxSize}
	ctx, cancel := context.WithTimeout(context.Background(), s.timeout)
	defer cancel()
	start := time.Now()
	a, b, stage, err := s.startPair(ctx)
	defer closePeers(a, b)
	if err != nil {
		return fail("exchange", stage, err)
	}
	res.A, res.B = a.info, b.info
	if res.HelloSends[0], err = hello(ctx, a, b); err != nil {
		return fail("exchange", "hello-a-to-b", err)
	}
	if res.HelloSends[1], err = hello(ctx, b, a); err != nil {
		return fail("exchange", "hello-b-to-a", err)
	}
	ab, err := transfer(ctx, a, b, *count, *maxSize)
	if err != nil {
		return fail("exchange", "a-to-b", err)
	}
	ba, err := transfer(ctx, b, a, *count, *maxSize)
	if err != nil {
		return fail("exchange", "b-to-a", err)
	}
	res.AToB, res.BToA = &ab, &ba
	res.OK = true
	res.ElapsedMs = ms(time.Since(start))
	emit(res)
	return 0
}

func runPeerGone(args []string) int {
	fs := flag.NewFlagSet("peergone", flag.ContinueOnError)
	cf := addCommonFlags(fs)
	if err := fs.Parse(args); err != nil {
		return 2
	}
	s, err := prepare("peergone", cf)
	if err != nil {
		return fail("peergone", "setup", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), s.timeout)
	defer cancel()
	start := time.Now()
	res := exchangeResult{Subcommand: "peergone", TailscaleVersion: tailscaleVersion(), Mode: s.mode, Region: int(s.region.RegionID)}
	a, b, stage, err := s.startPair(ctx)
	defer closePeers(a, b)
	if err != nil {
		return fail("peergone", stage, err)
	}
	res.A, res.B = a.info, b.info
	// B must have received from A: the server only tells receivers of a departed sender.
	if res.HelloSends[0], err = hello(ctx, a, b); err != nil {
		return fail("peergone", "hello-a-to-b", err)
	}
	closedAt := time.Now()
	if err := a.c.Close(); err != nil {
		return fail("peergone", "close-a", err)
	}
	for {
		select {
		case g := <-b.gone:
			if g.Peer != a.priv.Public() {
				logf("ignoring PeerGone for %v", g.Peer.ShortString())
				continue
			}
			res.PeerGone = &goneInfo{Peer: g.Peer.String(), Reason: int(g.Reason), ReasonName: reasonName(g.Reason), AfterMs: ms(time.Since(closedAt))}
			if g.Reason != derp.PeerGoneReasonDisconnected {
				return fail("peergone", "reason", fmt.Errorf("PeerGone for A with reason %d (%s), want 0 (disconnected)", g.Reason, reasonName(g.Reason)))
			}
			res.OK = true
			res.ElapsedMs = ms(time.Since(start))
			emit(res)
			return 0
		case err := <-b.recvErr:
			return fail("peergone", "recv-b", err)
		case <-ctx.Done():
			return fail("peergone", "wait-peergone", fmt.Errorf("B saw no PeerGone for A within the timeout: %w", ctx.Err()))
		}
	}
}

func reasonName(r derp.PeerGoneReasonType) string {
	switch r {
	case derp.PeerGoneReasonDisconnected:
		return "disconnected"
	case derp.PeerGoneReasonNotHere:
		return "not-here"
	default:
		return "other"
	}
}

func closePeers(ps ...*peer) {
	for _, p := range ps {
		if p != nil && p.c != nil {
			p.c.Close()
		}
	}
}
