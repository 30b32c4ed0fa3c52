package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"tailscale.com/net/netcheck"
	"tailscale.com/net/netmon"
)

// regionReport is what one netcheck.GetReport run found.
type regionReport struct {
	UDP             bool               `json:"udp"`
	IPv4            bool               `json:"ipv4"`
	GlobalV4        string             `json:"global_v4,omitempty"`
	GlobalV6        string             `json:"global_v6,omitempty"`
	PreferredDERP   int                `json:"preferred_derp"`
	RegionLatencyMs map[string]float64 `json:"region_latency_ms"`
	RegionV4Ms      map[string]float64 `json:"region_v4_latency_ms,omitempty"`
	ElapsedMs       float64            `json:"elapsed_ms"`
}

type netcheckResult struct {
	OK               bool          `json:"ok"`
	Subcommand       string        `json:"subcommand"`
	TailscaleVersion string        `json:"tailscale_version"`
	Region           int           `json:"region"`
	LocalUDP         string        `json:"local_udp"`
	STUN             *regionReport `json:"stun,omitempty"`
	HTTPS            *regionReport `json:"https,omitempty"`
	Stage            string        `json:"stage,omitempty"`
	Error            string        `json:"error,omitempty"`
}

func toReport(r *netcheck.Report, d time.Duration) *regionReport {
	out := &regionReport{
		UDP:             r.UDP,
		IPv4:            r.IPv4,
		PreferredDERP:   int(r.PreferredDERP),
		RegionLatencyMs: map[string]float64{},
		ElapsedMs:       ms(d),
	}
	if r.GlobalV4.IsValid() {
		out.GlobalV4 = r.GlobalV4.String()
	}
	if r.GlobalV6.IsValid() {
		out.GlobalV6 = r.GlobalV6.String()
	}
	for rid, l := range r.RegionLatency {
		out.RegionLatencyMs[strconv.Itoa(int(rid))] = ms(l)
	}
	if len(r.RegionV4Latency) > 0 {
		out.RegionV4Ms = map[string]float64{}
		for rid, l := range r.RegionV4Latency {
			out.RegionV4Ms[strconv.Itoa(int(rid))] = ms(l)
		}
	}
	return out
}

// runNetcheck runs the real netcheck client twice against the map:
//
//  1. a normal (full) report: STUN binding requests over a UDP socket on 127.0.0.1, fed back
//     through Client.ReceiveSTUNPacket exactly as magicsock does; gives UDP, the global
//     (mapped) address and the STUN latency per region;
//  2. a report with GetReportOpts.OnlyTCP443: no STUN, so netcheck falls back to
//     measureHTTPSLatency: derphttp.DialRegionTLS (same pinned TLS as DERP) plus
//     GET /derp/latency-check; gives the HTTPS latency per region.
//
// The second report is incremental (the first one had UDP), so no captive-portal check runs;
// the loopback-only interface getter makes sure it could not leave the machine anyway.
func runNetcheck(args []string) int {
	fs := flag.NewFlagSet("netcheck", flag.ContinueOnError)
	dmFile := fs.String("derpmap", "", "derpMap JSON file")
	region := fs.Int("region", 0, "region whose latency is required (default: lowest region ID)")
	timeout := fs.Duration("timeout", 30*time.Second, "overall time bound")
	skipSTUN := fs.Bool("skip-stun", false, "do not require the STUN report (still run)")
	skipHTTPS := fs.Bool("skip-https", false, "do not run the HTTPS latency report")
	verbose := fs.Bool("verbose", false, "netcheck verbose logging")
	caFile := fs.String("ca-file", "", "PEM roots to trust for nodes without a sha256-raw CertName (sets SSL_CERT_FILE)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *dmFile == "" {
		fmt.Fprintln(os.Stderr, "netcheck: -derpmap is required")
		return 2
	}
	if *caFile != "" {
		setCAFile(*caFile)
	}
	failWith := func(res *netcheckResult, stage string, err error) int {
		logf("netcheck: %s: %v", stage, err)
		res.Stage, res.Error = stage, err.Error()
		emit(res)
		return 1
	}
	dm, err := loadDERPMap(*dmFile)
	if err != nil {
		return fail("netcheck", "setup", err)
	}
	reg, err := pickRegion(dm, *region)
	if err != nil {
		return fail("netcheck", "setup", err)
	}
	rid := strconv.Itoa(int(reg.RegionID))
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()

	pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return fail("netcheck", "listen-udp", err)
	}
	defer pc.Close()
	// netcheck only logs why an HTTPS measurement failed; keep those lines for the error.
	var httpsErrMu sync.Mutex
	var httpsErrs []string
	ncLogf := func(format string, args ...any) {
		line := fmt.Sprintf(format, args...)
		if strings.Contains(line, "measuring HTTPS latency") {
			httpsErrMu.Lock()
			httpsErrs = append(httpsErrs, line)
			httpsErrMu.Unlock()
		}
		logf("%s", line)
	}
	nc := &netcheck.Client{
		NetMon:  netmon.NewStatic(),
		Logf:    ncLogf,
		Verbose: *verbose,
		SendPacket: func(b []byte, dst netip.AddrPort) (int, error) {
			return pc.WriteToUDPAddrPort(b, dst)
		},
	}
	go func() {
		buf := make([]byte, 64<<10)
		for {
			n, src, err := pc.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			nc.ReceiveSTUNPacket(buf[:n], src)
		}
	}()

	res := netcheckResult{Subcommand: "netcheck", TailscaleVersion: tailscaleVersion(), Region: int(reg.RegionID), LocalUDP: pc.LocalAddr().String()}
	t0 := time.Now()
	r, err := nc.GetReport(ctx, dm, nil)
	if err != nil {
		return fail("netcheck", "stun-report", err)
	}
	res.STUN = toReport(r, time.Since(t0))
	if !*skipSTUN {
		if !r.UDP {
			return failWith(&res, "stun-report", errors.New("no STUN answer (report.UDP=false)"))
		}
		if _, ok := res.STUN.RegionLatencyMs[rid]; !ok {
			return failWith(&res, "stun-report", fmt.Errorf("no STUN latency for region %s", rid))
		}
	}
	if !*skipHTTPS {
		t0 = time.Now()
		r, err = nc.GetReport(ctx, dm, &netcheck.GetReportOpts{OnlyTCP443: true})
		if err != nil {
			return fail("netcheck", "https-report", err)
		}
		res.HTTPS = toReport(r, time.Since(t0))
		if _, ok := res.HTTPS.RegionLatencyMs[rid]; !ok {
			httpsErrMu.Lock()
			why := strings.Join(httpsErrs, "; ")
			httpsErrMu.Unlock()
			if why == "" {
				why = "see stderr for the netcheck log"
			}
			return failWith(&res, "https-report", fmt.Errorf("no HTTPS latency for region %s: %s", rid, why))
		}
	}
	res.OK = true
	emit(res)
	return 0
}
