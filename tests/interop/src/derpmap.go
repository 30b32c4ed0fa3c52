package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"

	"gopkg.in/yaml.v3"
	"tailscale.com/tailcfg"
)

// decodeDERPMapJSON decodes a tailcfg.DERPMap strictly: unknown fields and trailing data
// are errors. (encoding/json still matches field names case-insensitively, exactly as
// tailscaled and control do when they decode a DERPMap.)
func decodeDERPMapJSON(b []byte) (*tailcfg.DERPMap, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var dm tailcfg.DERPMap
	if err := dec.Decode(&dm); err != nil {
		return nil, fmt.Errorf("decoding DERPMap JSON: %w", err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return nil, errors.New("decoding DERPMap JSON: trailing data after the JSON object")
	}
	return &dm, nil
}

// decodeDERPMapHeadscaleYAML decodes a DERP map the way headscale's derp.paths loader does
// (hscontrol/derp/derp.go loadDERPMapFromPath: gopkg.in/yaml.v3 Unmarshal straight into
// tailcfg.DERPMap). tailcfg has no yaml tags, so yaml.v3 expects the lower-cased Go field
// names: regions, regionid, regioncode, nodes, hostname, certname, ipv4, stunport,
// derpport, canport80, omitdefaultregions, ... With strict=true unknown keys are an error
// (headscale itself silently ignores them, which hides typos: strict is our default).
func decodeDERPMapHeadscaleYAML(b []byte, strict bool) (*tailcfg.DERPMap, error) {
	var dm tailcfg.DERPMap
	if strict {
		dec := yaml.NewDecoder(bytes.NewReader(b))
		dec.KnownFields(true)
		if err := dec.Decode(&dm); err != nil {
			return nil, fmt.Errorf("decoding headscale DERP YAML (strict): %w", err)
		}
		return &dm, nil
	}
	if err := yaml.Unmarshal(b, &dm); err != nil {
		return nil, fmt.Errorf("decoding headscale DERP YAML: %w", err)
	}
	return &dm, nil
}

func loadDERPMap(path string) (*tailcfg.DERPMap, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return decodeDERPMapJSON(b)
}

// pickRegion returns the region with the given ID, or the only/lowest-numbered one when id
// is 0.
func pickRegion(dm *tailcfg.DERPMap, id int) (*tailcfg.DERPRegion, error) {
	var ids []int
	for rid, r := range dm.Regions {
		if r == nil {
			continue
		}
		if id != 0 && int(rid) == id {
			return r, nil
		}
		ids = append(ids, int(rid))
	}
	if id != 0 {
		return nil, fmt.Errorf("region %d not in derpMap (have %v)", id, ids)
	}
	if len(ids) == 0 {
		return nil, errors.New("derpMap has no regions")
	}
	sort.Ints(ids)
	for rid, r := range dm.Regions {
		if int(rid) == ids[0] {
			return r, nil
		}
	}
	panic("unreachable")
}

// pickNode returns the node called name in reg, or the region's first non-STUNOnly node when
// name is empty.
func pickNode(reg *tailcfg.DERPRegion, name string) (*tailcfg.DERPNode, error) {
	var names []string
	for _, n := range reg.Nodes {
		if name == "" && !n.STUNOnly {
			return n, nil
		}
		if n.Name == name {
			return n, nil
		}
		names = append(names, n.Name)
	}
	if name == "" {
		return nil, fmt.Errorf("region %d has no DERP (non-STUNOnly) node", reg.RegionID)
	}
	return nil, fmt.Errorf("node %q not in region %d (have %v)", name, reg.RegionID, names)
}

// singleNodeRegion is reg restricted to node n, so that a region client dials exactly that
// node (derphttp dials Region.Nodes in order and takes the first that answers).
func singleNodeRegion(reg *tailcfg.DERPRegion, n *tailcfg.DERPNode) *tailcfg.DERPRegion {
	r := reg.Clone()
	r.Nodes = []*tailcfg.DERPNode{n.Clone()}
	return r
}

func runParseMap(args []string) int {
	fs := flag.NewFlagSet("parsemap", flag.ContinueOnError)
	file := fs.String("file", "", "derpMap file to read ('-' for stdin)")
	format := fs.String("format", "json", "input format: json (tailcfg.DERPMap JSON, strict) or headscale-yaml (headscale's DERP map YAML)")
	lenient := fs.Bool("lenient", false, "headscale-yaml only: ignore unknown keys exactly like headscale does (default: reject them)")
	indent := fs.Bool("indent", false, "indent the output JSON")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *file == "" {
		fmt.Fprintln(os.Stderr, "parsemap: -file is required")
		return 2
	}
	var b []byte
	var err error
	if *file == "-" {
		b, err = io.ReadAll(os.Stdin)
	} else {
		b, err = os.ReadFile(*file)
	}
	if err != nil {
		return fail("parsemap", "read", err)
	}
	var dm *tailcfg.DERPMap
	switch *format {
	case "json":
		dm, err = decodeDERPMapJSON(b)
	case "headscale-yaml", "yaml":
		dm, err = decodeDERPMapHeadscaleYAML(b, !*lenient)
	default:
		fmt.Fprintf(os.Stderr, "parsemap: unknown -format %q (want json or headscale-yaml)\n", *format)
		return 2
	}
	if err != nil {
		return fail("parsemap", "decode", err)
	}
	// Canonical tailcfg JSON: encoding/json of the real type (field order of the struct,
	// map keys sorted, omitempty applied).
	var out []byte
	if *indent {
		out, err = json.MarshalIndent(dm, "", "  ")
	} else {
		out, err = json.Marshal(dm)
	}
	if err != nil {
		return fail("parsemap", "encode", err)
	}
	os.Stdout.Write(append(out, '\n'))
	return 0
}
