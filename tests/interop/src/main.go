// Command derpinterop drives the real Tailscale client packages (derp/derphttp, net/netcheck,
// tailcfg, types/key) against a DERP relay described by a derpMap, so kubederp's Rust relay
// can be checked against the exact code that tailscaled runs.
//
// The same sources are built once per tailscale.com version (see ../build.sh): each module
// directory (../v1.82.5, ../latest) holds its own go.mod/go.sum, a version-specific
// compat.go, and symlinks to the files in this directory.
//
// Output contract: one JSON document on stdout (machine-readable, always an object with an
// "ok" field except for parsemap, which prints the DERPMap itself), human logs on stderr,
// exit status 0 on success and 1 on failure, 2 on usage errors. Every subcommand is bounded
// by -timeout.
//
// Network: everything stays on the addresses named in the derpMap (loopback in our tests).
// The netmon interface list is restricted to loopback interfaces (see loopbackOnly) so that
// netcheck's captive-portal detector, which would otherwise probe
// controlplane.tailscale.com over non-loopback interfaces, never sends anything.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	"tailscale.com/net/netmon"
)

func usage() {
	fmt.Fprintf(os.Stderr, `usage: derpinterop <subcommand> [flags]

subcommands:
  exchange   two fresh node keys connect through a region and exchange packets both ways
  peergone   B receives from A, A closes, B must observe PeerGone(A)
  load       N sender->receiver pairs of real clients at a fixed rate or capacity (load.go)
  netcheck   run the real netcheck client (STUN, then HTTPS latency) against a derpMap
  parsemap   read a derpMap (tailcfg JSON or headscale YAML) and print canonical tailcfg JSON
  version    print the tailscale.com version this binary was built against

run 'derpinterop <subcommand> -h' for the flags of a subcommand.
`)
}

func main() {
	log.SetFlags(log.Lmicroseconds)
	log.SetOutput(logWatch)
	netmon.RegisterInterfaceGetter(loopbackOnly)
	if len(os.Args) < 2 {
		usage()
		os.Exit(2)
	}
	args := os.Args[2:]
	switch os.Args[1] {
	case "exchange":
		os.Exit(runExchange(args))
	case "peergone":
		os.Exit(runPeerGone(args))
	case "load":
		os.Exit(runLoad(args))
	case "netcheck":
		os.Exit(runNetcheck(args))
	case "parsemap":
		os.Exit(runParseMap(args))
	case "version":
		emit(map[string]any{"ok": true, "tailscale_version": tailscaleVersion(), "go_version": goVersion()})
		os.Exit(0)
	case "-h", "--help", "help":
		usage()
		os.Exit(0)
	default:
		fmt.Fprintf(os.Stderr, "derpinterop: unknown subcommand %q\n", os.Args[1])
		usage()
		os.Exit(2)
	}
}

// loopbackOnly is registered as netmon's interface getter: the Tailscale packages only see
// loopback interfaces, so nothing in them (captive-portal detection in particular) ever
// probes a non-loopback network. STUN probes still run because nodes with IPv4 127.0.0.1
// are "test nodes" (tailcfg.DERPNode.IsTestNode) that netcheck probes regardless.
func loopbackOnly() ([]netmon.Interface, error) {
	ifs, err := net.Interfaces()
	if err != nil {
		return nil, err
	}
	var out []netmon.Interface
	for i := range ifs {
		if ifs[i].Flags&net.FlagLoopback != 0 {
			out = append(out, netmon.Interface{Interface: &ifs[i]})
		}
	}
	return out, nil
}

// tailscaleVersion reports the tailscale.com module version linked into this binary.
func tailscaleVersion() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	for _, d := range bi.Deps {
		if d.Path == "tailscale.com" {
			return d.Version
		}
	}
	return "unknown"
}

func goVersion() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	return bi.GoVersion
}

// emit writes v as one JSON document to stdout.
func emit(v any) {
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	if err := enc.Encode(v); err != nil {
		fmt.Fprintf(os.Stderr, "derpinterop: writing JSON: %v\n", err)
		os.Exit(1)
	}
}

// failure is the JSON document printed when a subcommand fails.
type failure struct {
	OK               bool   `json:"ok"`
	Subcommand       string `json:"subcommand"`
	TailscaleVersion string `json:"tailscale_version"`
	Stage            string `json:"stage"`
	Error            string `json:"error"`
}

func fail(sub, stage string, err error) int {
	log.Printf("%s: %s: %v", sub, stage, err)
	emit(failure{OK: false, Subcommand: sub, TailscaleVersion: tailscaleVersion(), Stage: stage, Error: err.Error()})
	return 1
}

func logf(format string, args ...any) {
	log.Printf(format, args...)
}

func ms(d time.Duration) float64 {
	return float64(d.Microseconds()) / 1000
}

// logWatcher forwards the standard logger to stderr and remembers whether the derphttp
// WebSocket dialer announced a connection (websocket.go logs "websocket: connected to <url>"
// from inside the real client; it is the only externally visible sign that the WebSocket
// code path, not the TCP one, was taken).
type logWatcher struct {
	mu          sync.Mutex
	out         io.Writer
	wsConnected int
}

var logWatch = &logWatcher{out: os.Stderr}

func (w *logWatcher) Write(p []byte) (int, error) {
	w.mu.Lock()
	w.wsConnected += strings.Count(string(p), "websocket: connected to ")
	w.mu.Unlock()
	return w.out.Write(p)
}

func (w *logWatcher) websocketConnects() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.wsConnected
}
