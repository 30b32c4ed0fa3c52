// Command tailnet-control runs Tailscale's own test control server
// (tailscale.com/tstest/integration/testcontrol) on a loopback port, so that real
// tailscaled processes can form a tailnet without touching the internet.
//
// Usage:
//
//	tailnet-control serve [--addr 127.0.0.1:0]
//	    Prints "control-url http://127.0.0.1:PORT" on stdout once listening, then serves
//	    until stdin reaches EOF (so it dies with the process that started it) or SIGTERM.
//	    The DERP map handed to nodes has one region: a DERP server (Tailscale's own
//	    derp/derpserver, TLS with a throwaway self-signed certificate, InsecureForTests) and
//	    a STUN server, both run in this process on the same loopback IP. tailscaled only
//	    reports "Running" once it has a live DERP connection, and with no region it would fall
//	    back to the built-in production map for captive-portal checks.
//	    Every node also gets NodeAttrDisableCaptivePortalDetection.
//	    The same listener is a traffic trap: a request for any other host (what a
//	    tailscaled started with HTTP(S)_PROXY pointing here sends for any non-loopback
//	    URL) is refused, counted and logged as "traffic-trap: ...".
//	    GET /kubederp/nodes returns the node keys seen in map requests and the trap count.
//	tailnet-control privkey STATEFILE
//	    Prints the current profile's node private key ("privkey:<hex>") from a
//	    tailscaled --statedir state file, so a test can act as that tailnet member.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"os/signal"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"

	"tailscale.com/derp/derpserver"
	"tailscale.com/ipn"
	"tailscale.com/net/stunserver"
	"tailscale.com/tailcfg"
	"tailscale.com/tstest/integration/testcontrol"
	"tailscale.com/types/key"
)

func main() {
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	log.SetPrefix("tailnet-control: ")
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: tailnet-control serve [--addr 127.0.0.1:0] | privkey STATEFILE")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "serve":
		serve(os.Args[2:])
	case "privkey":
		if len(os.Args) != 3 {
			log.Fatal("usage: tailnet-control privkey STATEFILE")
		}
		privkey(os.Args[2])
	default:
		log.Fatalf("unknown subcommand %q", os.Args[1])
	}
}

func serve(args []string) {
	fs := flag.NewFlagSet("serve", flag.ExitOnError)
	addr := fs.String("addr", "127.0.0.1:0", "loopback address to listen on")
	fs.Parse(args)

	host, _, err := net.SplitHostPort(*addr)
	if err != nil {
		log.Fatalf("bad --addr: %v", err)
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		log.Fatalf("--addr must be a loopback IP address, got %q", *addr)
	}
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatalf("listen: %v", err)
	}
	baseURL := "http://" + ln.Addr().String()

	var (
		mu    sync.Mutex
		keys  = map[string]bool{}
		traps atomic.Int64
	)
	derpMap := runDERPAndSTUN(host)
	caps := tailcfg.NodeCapMap{
		// testcontrol's defaults ...
		tailcfg.CapabilityHTTPS:       []tailcfg.RawMessage{},
		tailcfg.CapabilityFileSharing: []tailcfg.RawMessage{},
		// ... plus: never probe for captive portals (those probes go to DERP servers).
		tailcfg.NodeAttrDisableCaptivePortalDetection: []tailcfg.RawMessage{},
	}
	control := &testcontrol.Server{
		Logf: log.Printf,
		// Never nil: nil would mean the production DERP map.
		DERPMap:                 derpMap,
		DefaultNodeCapabilities: &caps,
		AllNodesSameUser:        true,
		AllOnline:               true,
		ExplicitBaseURL:         baseURL,
		HoldMapRequest: func(req *tailcfg.MapRequest) func() {
			mu.Lock()
			keys[req.NodeKey.String()] = true
			mu.Unlock()
			return nil
		},
	}
	ctlHost := ln.Addr().String()
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodConnect || r.Host != ctlHost {
			n := traps.Add(1)
			log.Printf("traffic-trap: #%d %s %s (host %q) from %s", n, r.Method, r.RequestURI, r.Host, r.RemoteAddr)
			http.Error(w, "kubederp tailnet-control: outbound traffic refused", http.StatusBadGateway)
			return
		}
		if r.URL.Path == "/kubederp/nodes" {
			mu.Lock()
			list := make([]string, 0, len(keys))
			for k := range keys {
				list = append(list, k)
			}
			mu.Unlock()
			sort.Strings(list)
			w.Header().Set("Content-Type", "application/json")
			json.NewEncoder(w).Encode(map[string]any{
				"NodeKeys":       list,
				"NumNodes":       control.NumNodes(),
				"TrafficTrapped": traps.Load(),
			})
			return
		}
		control.ServeHTTP(w, r)
	})

	go func() {
		if err := http.Serve(ln, handler); err != nil {
			log.Fatalf("serve: %v", err)
		}
	}()
	fmt.Printf("control-url %s\n", baseURL)
	os.Stdout.Sync()

	done := make(chan string, 2)
	go func() {
		io.Copy(io.Discard, bufio.NewReader(os.Stdin))
		done <- "stdin closed"
	}()
	go func() {
		c := make(chan os.Signal, 1)
		signal.Notify(c, syscall.SIGTERM, syscall.SIGINT)
		done <- (<-c).String()
	}()
	log.Printf("exiting: %s (traffic trapped: %d)", <-done, traps.Load())
}

// runDERPAndSTUN starts a DERP server (TLS, self-signed) and a STUN server on ip, as
// tailscale.com/tstest/integration.RunDERPAndSTUN does, and returns a one-region map.
func runDERPAndSTUN(ip string) *tailcfg.DERPMap {
	d := derpserver.New(key.NewNode(), log.Printf)
	ln, err := net.Listen("tcp", net.JoinHostPort(ip, "0"))
	if err != nil {
		log.Fatalf("derp listen: %v", err)
	}
	srv := httptest.NewUnstartedServer(derpserver.Handler(d))
	srv.Listener.Close()
	srv.Listener = ln
	srv.Config.ErrorLog = log.New(os.Stderr, "tailnet-control: derp http: ", log.LstdFlags)
	srv.StartTLS()

	stun := stunserver.New(context.Background())
	if err := stun.Listen(net.JoinHostPort(ip, "0")); err != nil {
		log.Fatalf("stun listen: %v", err)
	}
	go stun.Serve()
	stunPort := netip.MustParseAddrPort(stun.LocalAddr().String()).Port()
	derpPort := ln.Addr().(*net.TCPAddr).Port
	log.Printf("derp on %s:%d (tls, self-signed), stun on %s:%d", ip, derpPort, ip, stunPort)
	return &tailcfg.DERPMap{
		Regions: map[tailcfg.DERPRegionID]*tailcfg.DERPRegion{
			900: {
				RegionID:   900,
				RegionCode: "loopback",
				RegionName: "kubederp loopback",
				Nodes: []*tailcfg.DERPNode{{
					Name:             "900a",
					RegionID:         900,
					HostName:         ip,
					IPv4:             ip,
					IPv6:             "none",
					STUNPort:         int(stunPort),
					DERPPort:         derpPort,
					InsecureForTests: true,
					STUNTestIP:       ip,
				}},
			},
		},
	}
}

func privkey(path string) {
	raw, err := os.ReadFile(path)
	if err != nil {
		log.Fatal(err)
	}
	var state map[ipn.StateKey][]byte
	if err := json.Unmarshal(raw, &state); err != nil {
		log.Fatalf("parsing %s: %v", path, err)
	}
	cur := strings.TrimSpace(string(state[ipn.CurrentProfileStateKey]))
	if cur == "" {
		log.Fatalf("%s has no current profile (node not logged in yet?)", path)
	}
	var prefs ipn.Prefs
	if err := json.Unmarshal(state[ipn.StateKey(cur)], &prefs); err != nil {
		log.Fatalf("parsing profile %q: %v", cur, err)
	}
	if prefs.Persist == nil || prefs.Persist.PrivateNodeKey.IsZero() {
		log.Fatalf("profile %q has no node key yet", cur)
	}
	text, err := prefs.Persist.PrivateNodeKey.MarshalText()
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("%s\n", text)
}
