// loadgen: the load generator of bench/run.py. Go standard library only (builds with Debian 12's
// golang-go 1.19, no network).
//
// Every worker owns its connection: one http.Transport per worker, at most one connection each
// (MaxConnsPerHost=1, MaxIdleConnsPerHost=1), so a keep-alive run with -c C opens exactly C
// connections; every TCP dial is counted and a keep-alive run that dialled anything but C times
// fails (exit status 3). Through a proxy it tunnels with HTTP CONNECT (Transport.Proxy); TLS is
// verified against the PEM roots given with -ca and the real server name (never
// InsecureSkipVerify). HTTP/1.1 only. Every loop is bounded by a count and by a deadline, and
// -timeout is a hard stop for the whole process (exit status 4).
//
// Modes:
//
//	keepalive  -c workers, one kept connection each, GET -path for -d after -warmup
//	newconn    -c workers, a new TCP+TLS connection for every request; with -resume, each new
//	           connection resumes a TLS session of an earlier one (all workers share one client session
//	           cache, as a browser's connections to one site do), and the result counts resumed handshakes
//	download   one GET of -path on a warm connection; -size bytes expected
//	upload     one POST of -size bytes to -path on a warm connection
//	setup      -names host names (fmt -names-fmt), one new connection each, in order, -passes times
//	idle       open -n connections (one GET each) and hold them; driven by lines on stdin
//	probe      one GET on a new connection; says whether it worked and what certificate was served
//
// The result is one JSON object on stdout (its last line). /proc/stat is read at the start and the
// end of the measured window, so the result carries how busy each CPU was while it was measured.
package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/url"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

type config struct {
	mode        string
	proxy       string
	origin      string
	caFile      string
	host        string
	port        int
	path        string
	c           int
	n           int
	duration    time.Duration
	warmup      time.Duration
	timeout     time.Duration
	reqTimeout  time.Duration
	size        int64
	namesFmt    string
	names       int
	passes      int
	idleWarm    int
	idleHold    time.Duration
	dialTimeout time.Duration
	resume      bool
}

var (
	cfg   config
	roots *x509.CertPool
	dials int64 // every TCP dial, to the proxy or (direct) to the origin
	// -resume: the one client session cache of every transport (TLS 1.3 tickets, TLS 1.2 tickets)
	sessions tls.ClientSessionCache
	// TLS handshakes completed in newconn mode, and how many of them resumed a session
	handshakes, resumed int64
)

// --- results ------------------------------------------------------------------------------------

type summary struct {
	N    int     `json:"n"`
	P50  float64 `json:"p50_ms"`
	P90  float64 `json:"p90_ms"`
	P99  float64 `json:"p99_ms"`
	Max  float64 `json:"max_ms"`
	Mean float64 `json:"mean_ms"`
}

// pct: the q-th percentile (0..100), linear interpolation between closest ranks (as bench/_common.py).
func pct(sorted []float64, q float64) float64 {
	if len(sorted) == 0 {
		return math.NaN()
	}
	k := float64(len(sorted)-1) * q / 100
	lo, hi := math.Floor(k), math.Ceil(k)
	return sorted[int(lo)] + (sorted[int(hi)]-sorted[int(lo)])*(k-lo)
}

func summarize(seconds []float64) *summary {
	if len(seconds) == 0 {
		return &summary{}
	}
	xs := append([]float64(nil), seconds...)
	sort.Float64s(xs)
	sum := 0.0
	for _, x := range xs {
		sum += x
	}
	ms := func(s float64) float64 { return s * 1e3 }
	return &summary{
		N: len(xs), P50: ms(pct(xs, 50)), P90: ms(pct(xs, 90)), P99: ms(pct(xs, 99)),
		Max: ms(xs[len(xs)-1]), Mean: ms(sum / float64(len(xs))),
	}
}

type result struct {
	Mode         string             `json:"mode"`
	Via          string             `json:"via"`
	Concurrency  int                `json:"concurrency,omitempty"`
	Requests     int                `json:"requests"`
	Errors       int                `json:"errors"`
	ErrorSamples []string           `json:"error_samples,omitempty"`
	Dials        int64              `json:"dials"`
	WarmupDials  int64              `json:"warmup_dials"`
	PeerCloses   int64              `json:"peer_closes"`
	CloseResps   int64              `json:"connection_close_responses"`
	Elapsed      float64            `json:"elapsed_s"`
	RPS          float64            `json:"rps,omitempty"`
	Bytes        int64              `json:"bytes,omitempty"`
	MBps         float64            `json:"mb_per_s,omitempty"`
	Latency      *summary           `json:"latency,omitempty"`
	Passes       []map[string]any   `json:"passes,omitempty"`
	CPUBusy      map[string]float64 `json:"cpu_busy_pct"`
	Extra        map[string]any     `json:"extra,omitempty"`
	Fail         string             `json:"fail,omitempty"`
	errorsMu     sync.Mutex
	errorsByKind map[string]int
}

func (r *result) addError(err error) {
	r.errorsMu.Lock()
	defer r.errorsMu.Unlock()
	r.Errors++
	if r.errorsByKind == nil {
		r.errorsByKind = map[string]int{}
	}
	msg := err.Error()
	if len(msg) > 300 {
		msg = msg[:300]
	}
	if r.errorsByKind[msg] == 0 && len(r.ErrorSamples) < 10 {
		r.ErrorSamples = append(r.ErrorSamples, msg)
	}
	r.errorsByKind[msg]++
}

// --- /proc/stat -----------------------------------------------------------------------------------

type cpuTimes struct{ busy, total uint64 }

func readCPU() map[string]cpuTimes {
	out := map[string]cpuTimes{}
	data, err := os.ReadFile("/proc/stat")
	if err != nil {
		return out
	}
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 || !strings.HasPrefix(f[0], "cpu") || f[0] == "cpu" {
			continue
		}
		var total, idle uint64
		for i, v := range f[1:] {
			if i >= 8 { // user nice system idle iowait irq softirq steal (guest is counted in user)
				break
			}
			x, _ := strconv.ParseUint(v, 10, 64)
			total += x
			if i == 3 || i == 4 {
				idle += x
			}
		}
		out[f[0]] = cpuTimes{total - idle, total}
	}
	return out
}

func cpuBusy(a, b map[string]cpuTimes) map[string]float64 {
	out := map[string]float64{}
	for k, x := range b {
		y, ok := a[k]
		if !ok || x.total <= y.total {
			continue
		}
		out[k] = math.Round(1000*float64(x.busy-y.busy)/float64(x.total-y.total)) / 10
	}
	return out
}

// --- clients -------------------------------------------------------------------------------------

// countedConn counts the connections the other side closed first at the TCP level (a read saw EOF
// or an error before this side closed). A TLS 1.3 close_notify is not seen here: the TLS layer stops
// reading after it; keep-alive runs list when each unexpected new connection was made instead.
type countedConn struct {
	net.Conn
	closed int32
	peer   int32
}

var (
	measureStart time.Time
	newConnMu    sync.Mutex
	newConns     []string
)

var (
	peerCloses     int64 // connections whose TCP read saw an error or EOF before this side closed them
	closeResponses int64 // responses that said "Connection: close"
)

func (c *countedConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if err != nil && atomic.LoadInt32(&c.closed) == 0 && atomic.CompareAndSwapInt32(&c.peer, 0, 1) {
		atomic.AddInt64(&peerCloses, 1)
	}
	return n, err
}

func (c *countedConn) Close() error {
	atomic.StoreInt32(&c.closed, 1)
	return c.Conn.Close()
}

func dial(ctx context.Context, network, addr string) (net.Conn, error) {
	atomic.AddInt64(&dials, 1)
	if cfg.proxy == "" {
		addr = cfg.origin // direct: every name is on the origin (the bench names are not in DNS)
	}
	d := net.Dialer{Timeout: cfg.dialTimeout}
	conn, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	return &countedConn{Conn: conn}, nil
}

// newTransport: one connection at most (keepAlive) or a new connection per request.
func newTransport(keepAlive bool, bulk bool) *http.Transport {
	t := &http.Transport{
		DialContext: dial,
		TLSClientConfig: &tls.Config{
			RootCAs:            roots,
			NextProtos:         []string{"http/1.1"},
			MinVersion:         tls.VersionTLS12,
			ClientSessionCache: sessions, // nil (no resumption) unless -resume
		},
		TLSHandshakeTimeout:   cfg.reqTimeout,
		ResponseHeaderTimeout: cfg.reqTimeout,
		DisableKeepAlives:     !keepAlive,
		DisableCompression:    true,
		MaxIdleConns:          1,
		MaxIdleConnsPerHost:   1,
		ForceAttemptHTTP2:     false,
		TLSNextProto:          map[string]func(string, *tls.Conn) http.RoundTripper{}, // no h2
	}
	if keepAlive {
		t.MaxConnsPerHost = 1
	}
	if bulk {
		t.WriteBufferSize = 256 << 10
		t.ReadBufferSize = 256 << 10
	}
	if cfg.proxy != "" {
		t.Proxy = http.ProxyURL(&url.URL{Scheme: "http", Host: cfg.proxy})
	}
	return t
}

func targetURL(host, path string) string {
	return fmt.Sprintf("https://%s:%d%s", host, cfg.port, path)
}

// get: one GET, the whole body read; returns the bytes of the body.
func get(ctx context.Context, client *http.Client, u string) (int64, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return 0, err
	}
	req.Header.Set("User-Agent", "bumper-bench-loadgen")
	resp, err := client.Do(req)
	if err != nil {
		return 0, err
	}
	if resp.Close {
		atomic.AddInt64(&closeResponses, 1)
	}
	n, err := io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if err != nil {
		return n, err
	}
	if resp.StatusCode != 200 {
		return n, fmt.Errorf("status %d", resp.StatusCode)
	}
	if resp.ContentLength >= 0 && n != resp.ContentLength {
		return n, fmt.Errorf("body %d bytes, Content-Length %d", n, resp.ContentLength)
	}
	return n, nil
}

func newClient(t *http.Transport) *http.Client {
	return &http.Client{
		Transport: t,
		Timeout:   cfg.reqTimeout,
		CheckRedirect: func(*http.Request, []*http.Request) error {
			return http.ErrUseLastResponse
		},
	}
}

// --- keepalive / newconn ------------------------------------------------------------------------

func runRequests(res *result, keepAlive bool) {
	u := targetURL(cfg.host, cfg.path)
	warmEnd := time.Now().Add(cfg.warmup)
	measureEnd := warmEnd.Add(cfg.duration)
	var started int64 // measured requests started, bounded by -n
	var mu sync.Mutex
	var all []float64
	var bytes int64
	var lastEnd time.Time
	var wg sync.WaitGroup
	ready := make(chan struct{})
	var readyWG sync.WaitGroup
	for w := 0; w < cfg.c; w++ {
		wg.Add(1)
		readyWG.Add(1)
		go func() {
			defer wg.Done()
			client := newClient(newTransport(keepAlive, false))
			defer client.Transport.(*http.Transport).CloseIdleConnections()
			// Every connection after the worker's first is unexpected in a keep-alive run: say when it
			// came, after how many requests on the previous one, and how long after its last response.
			ctx := context.Background()
			if !keepAlive {
				ctx = httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{
					TLSHandshakeDone: func(st tls.ConnectionState, err error) {
						if err == nil {
							atomic.AddInt64(&handshakes, 1)
							if st.DidResume {
								atomic.AddInt64(&resumed, 1)
							}
						}
					},
				})
			}
			var prevEnd time.Time
			var onConn, conns int
			measuring := false
			if keepAlive {
				ctx = httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{
					GotConn: func(info httptrace.GotConnInfo) {
						if !info.Reused {
							conns++
							if conns > 1 {
								phase := "in the warm-up"
								if measuring {
									phase = fmt.Sprintf("at +%.3f s", time.Since(measureStart).Seconds())
								}
								newConnMu.Lock()
								if len(newConns) < 20 {
									newConns = append(newConns, fmt.Sprintf(
										"%s, after %d requests on the previous one, %.1f ms after its last response",
										phase, onConn, time.Since(prevEnd).Seconds()*1e3))
								}
								newConnMu.Unlock()
							}
							onConn = 0
						}
						onConn++
					},
					PutIdleConn: func(err error) {
						prevEnd = time.Now()
						if err != nil {
							res.addError(fmt.Errorf("connection not kept: %w", err))
						}
					},
				})
			}
			// warm-up: at least one request (the connection is opened), then until warmEnd
			first := true
			for first || time.Now().Before(warmEnd) {
				if _, err := get(ctx, client, u); err != nil {
					res.addError(fmt.Errorf("warm-up: %w", err))
					if !first {
						break
					}
				}
				if first {
					first = false
					readyWG.Done()
				}
			}
			<-ready
			measuring = true
			var lat []float64
			var myBytes int64
			var myEnd time.Time
			for time.Now().Before(measureEnd) && atomic.AddInt64(&started, 1) <= int64(cfg.n) {
				t0 := time.Now()
				n, err := get(ctx, client, u)
				t1 := time.Now()
				if err != nil {
					res.addError(err)
					continue
				}
				lat = append(lat, t1.Sub(t0).Seconds())
				myBytes += n
				myEnd = t1
			}
			mu.Lock()
			all = append(all, lat...)
			bytes += myBytes
			if myEnd.After(lastEnd) {
				lastEnd = myEnd
			}
			mu.Unlock()
		}()
	}
	readyWG.Wait() // every worker has its connection (or failed once)
	if d := time.Until(warmEnd); d > 0 {
		time.Sleep(d)
	}
	res.WarmupDials = atomic.LoadInt64(&dials)
	cpu0 := readCPU()
	start := time.Now()
	measureStart = start
	measureEnd = start.Add(cfg.duration) // read by the workers only after ready is closed
	close(ready)
	wg.Wait()
	cpu1 := readCPU()
	if lastEnd.Before(start) {
		lastEnd = time.Now()
	}
	res.CPUBusy = cpuBusy(cpu0, cpu1)
	res.Elapsed = lastEnd.Sub(start).Seconds()
	res.Requests = len(all)
	res.Bytes = bytes
	res.Latency = summarize(all)
	if res.Elapsed > 0 {
		res.RPS = float64(len(all)) / res.Elapsed
	}
	res.Dials = atomic.LoadInt64(&dials)
	if len(newConns) > 0 {
		res.Extra = map[string]any{"unexpected_new_connections": newConns}
	}
	if keepAlive && res.Dials != int64(cfg.c) {
		res.Fail = fmt.Sprintf("keep-alive run opened %d connections, not exactly c=%d (%d during the warm-up; "+
			"%d responses said Connection: close, %d connections closed by the other side)",
			res.Dials, cfg.c, res.WarmupDials, atomic.LoadInt64(&closeResponses), atomic.LoadInt64(&peerCloses))
	}
	if !keepAlive {
		res.Extra = map[string]any{
			"measured_dials": res.Dials - res.WarmupDials,
			"handshakes":     atomic.LoadInt64(&handshakes),
			"resumed":        atomic.LoadInt64(&resumed),
			"resume":         cfg.resume,
		}
	}
}

// --- download / upload ---------------------------------------------------------------------------

// patternReader: SIZE bytes of a repeated 64 KiB pattern, without allocating SIZE.
type patternReader struct {
	left int64
	buf  []byte
}

func (p *patternReader) Read(b []byte) (int, error) {
	if p.left <= 0 {
		return 0, io.EOF
	}
	n := len(b)
	if int64(n) > p.left {
		n = int(p.left)
	}
	for i := 0; i < n; {
		i += copy(b[i:n], p.buf)
	}
	p.left -= int64(n)
	return n, nil
}

func runBulk(res *result, upload bool) {
	client := newClient(newTransport(true, true))
	client.Timeout = cfg.timeout
	defer client.Transport.(*http.Transport).CloseIdleConnections()
	// The connection (and any mint) is made by a small request first, so only the transfer is timed.
	if _, err := get(context.Background(), client, targetURL(cfg.host, "/1k")); err != nil {
		res.addError(fmt.Errorf("warm-up: %w", err))
		res.Fail = "warm-up request failed"
		return
	}
	res.WarmupDials = atomic.LoadInt64(&dials)
	cpu0 := readCPU()
	t0 := time.Now()
	var n int64
	var err error
	if upload {
		buf := make([]byte, 64<<10)
		for i := range buf {
			buf[i] = byte('a' + i%26)
		}
		var req *http.Request
		req, err = http.NewRequest(http.MethodPost, targetURL(cfg.host, cfg.path), &patternReader{cfg.size, buf})
		if err == nil {
			req.ContentLength = cfg.size
			req.Header.Set("Content-Type", "application/octet-stream")
			var resp *http.Response
			resp, err = client.Do(req)
			if err == nil {
				_, err = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if err == nil && resp.StatusCode != 200 {
					err = fmt.Errorf("status %d", resp.StatusCode)
				}
				n = cfg.size
			}
		}
	} else {
		n, err = get(context.Background(), client, targetURL(cfg.host, cfg.path))
		if err == nil && n != cfg.size {
			err = fmt.Errorf("downloaded %d bytes, want %d", n, cfg.size)
		}
	}
	elapsed := time.Since(t0).Seconds()
	res.CPUBusy = cpuBusy(cpu0, readCPU())
	res.Dials = atomic.LoadInt64(&dials)
	res.Elapsed = elapsed
	if err != nil {
		res.addError(err)
		res.Fail = "transfer failed: " + err.Error()
		return
	}
	res.Requests = 1
	res.Bytes = n
	res.MBps = float64(n) / 1e6 / elapsed
	if res.Dials != 1 {
		res.Fail = fmt.Sprintf("the transfer opened %d connections, not 1", res.Dials)
	}
}

// --- setup: one new connection per host name ------------------------------------------------------

func runSetup(res *result) {
	names := make([]string, cfg.names)
	for i := range names {
		names[i] = fmt.Sprintf(cfg.namesFmt, i)
	}
	cpu0 := readCPU()
	t0 := time.Now()
	for pass := 0; pass < cfg.passes; pass++ {
		var setup, tunnel, handshake, total []float64
		errs := 0
		var samples []string
		for _, name := range names {
			if time.Since(t0) > cfg.duration {
				res.addError(errors.New("setup: -d exceeded, pass cut short"))
				break
			}
			var tStart, tTLS, tTLSDone time.Time
			trace := &httptrace.ClientTrace{
				TLSHandshakeStart: func() { tTLS = time.Now() },
				TLSHandshakeDone:  func(tls.ConnectionState, error) { tTLSDone = time.Now() },
			}
			t := newTransport(false, false)
			client := newClient(t)
			ctx := httptrace.WithClientTrace(context.Background(), trace)
			tStart = time.Now()
			_, err := get(ctx, client, targetURL(name, "/"))
			tEnd := time.Now()
			t.CloseIdleConnections()
			if err != nil {
				errs++
				res.addError(fmt.Errorf("%s: %w", name, err))
				if len(samples) < 3 {
					samples = append(samples, name+": "+err.Error())
				}
				continue
			}
			setup = append(setup, tTLSDone.Sub(tStart).Seconds())
			tunnel = append(tunnel, tTLS.Sub(tStart).Seconds())
			handshake = append(handshake, tTLSDone.Sub(tTLS).Seconds())
			total = append(total, tEnd.Sub(tStart).Seconds())
			res.Requests++
		}
		res.Passes = append(res.Passes, map[string]any{
			"pass":      pass,
			"setup":     summarize(setup),
			"tunnel":    summarize(tunnel),
			"handshake": summarize(handshake),
			"total":     summarize(total),
			"errors":    errs,
			"samples":   samples,
		})
	}
	res.Elapsed = time.Since(t0).Seconds()
	res.CPUBusy = cpuBusy(cpu0, readCPU())
	res.Dials = atomic.LoadInt64(&dials)
}

// --- idle: hold N connections open -----------------------------------------------------------------

func openMany(count int, clients []*http.Client, res *result, u string) int {
	sem := make(chan struct{}, 10)
	var ok int64
	var wg sync.WaitGroup
	deadline := time.Now().Add(cfg.duration)
	for i := 0; i < count; i++ {
		if time.Now().After(deadline) {
			res.addError(errors.New("idle: -d exceeded while opening connections"))
			break
		}
		wg.Add(1)
		sem <- struct{}{}
		go func(i int) {
			defer wg.Done()
			defer func() { <-sem }()
			c := newClient(newTransport(true, false))
			if _, err := get(context.Background(), c, u); err != nil {
				res.addError(err)
				return
			}
			clients[i] = c
			atomic.AddInt64(&ok, 1)
		}(i)
	}
	wg.Wait()
	return int(ok)
}

func runIdle(res *result) {
	u := targetURL(cfg.host, cfg.path)
	in := bufio.NewScanner(os.Stdin)
	wait := func(what string) {
		lines := make(chan bool, 1)
		go func() { lines <- in.Scan() }()
		select {
		case <-lines:
		case <-time.After(cfg.idleHold):
			res.addError(fmt.Errorf("idle: no %q line on stdin within %s", what, cfg.idleHold))
		}
	}
	// Warm-up: a few connections opened and closed, so the proxy's one-time costs are paid.
	warm := make([]*http.Client, cfg.idleWarm)
	openMany(cfg.idleWarm, warm, res, u)
	for _, c := range warm {
		if c != nil {
			c.Transport.(*http.Transport).CloseIdleConnections()
		}
	}
	time.Sleep(500 * time.Millisecond)
	res.WarmupDials = atomic.LoadInt64(&dials)
	fmt.Println("warm")
	wait("go")
	clients := make([]*http.Client, cfg.n)
	t0 := time.Now()
	held := openMany(cfg.n, clients, res, u)
	res.Elapsed = time.Since(t0).Seconds()
	dialsHeld := atomic.LoadInt64(&dials)
	fmt.Printf("held %d\n", held)
	wait("done")
	// Check that the proxy kept them: one more request on each, which must not dial.
	var wg sync.WaitGroup
	sem := make(chan struct{}, 10)
	var reusedOK int64
	for _, c := range clients {
		if c == nil {
			continue
		}
		wg.Add(1)
		sem <- struct{}{}
		go func(c *http.Client) {
			defer wg.Done()
			defer func() { <-sem }()
			if _, err := get(context.Background(), c, u); err == nil {
				atomic.AddInt64(&reusedOK, 1)
			}
		}(c)
	}
	wg.Wait()
	for _, c := range clients {
		if c != nil {
			c.Transport.(*http.Transport).CloseIdleConnections()
		}
	}
	res.Requests = held
	res.Dials = atomic.LoadInt64(&dials)
	res.Extra = map[string]any{
		"held":                     held,
		"dials_while_opening":      dialsHeld - res.WarmupDials,
		"requests_ok_after_hold":   reusedOK,
		"redials_after_hold":       res.Dials - dialsHeld,
		"connections_lost_on_hold": int64(held) - (reusedOK - (res.Dials - dialsHeld)),
	}
	if held != cfg.n {
		res.Fail = fmt.Sprintf("held %d connections, not %d", held, cfg.n)
	}
}

// --- probe: one request, and what was served ---------------------------------------------------------

func runProbe(res *result) {
	var leaf *x509.Certificate
	trace := &httptrace.ClientTrace{
		TLSHandshakeDone: func(st tls.ConnectionState, err error) {
			if err == nil && len(st.PeerCertificates) > 0 {
				leaf = st.PeerCertificates[0]
			}
		},
	}
	t := newTransport(false, false)
	defer t.CloseIdleConnections()
	ctx := httptrace.WithClientTrace(context.Background(), trace)
	t0 := time.Now()
	_, err := get(ctx, newClient(t), targetURL(cfg.host, cfg.path))
	res.Elapsed = time.Since(t0).Seconds()
	res.Dials = atomic.LoadInt64(&dials)
	res.Extra = map[string]any{"ok": err == nil}
	if leaf != nil {
		res.Extra["leaf_subject"] = leaf.Subject.String()
		res.Extra["leaf_issuer"] = leaf.Issuer.String()
		res.Extra["leaf_dns_names"] = leaf.DNSNames
	}
	if err != nil {
		res.addError(err)
		return
	}
	res.Requests = 1
}

// --- main ------------------------------------------------------------------------------------------

func main() {
	flag.StringVar(&cfg.mode, "mode", "keepalive", "keepalive|newconn|download|upload|setup|idle")
	flag.StringVar(&cfg.proxy, "proxy", "", "HOST:PORT of the proxy (HTTP CONNECT); empty: direct")
	flag.StringVar(&cfg.origin, "origin", "127.0.0.1:8443", "HOST:PORT dialled for every name when direct")
	flag.StringVar(&cfg.caFile, "ca", "", "PEM roots the served certificate must chain to (required)")
	flag.StringVar(&cfg.host, "host", "origin.bench.test", "host name in the URL (SNI, Host, CONNECT)")
	flag.IntVar(&cfg.port, "port", 8443, "port in the URL")
	flag.StringVar(&cfg.path, "path", "/1k", "path")
	flag.IntVar(&cfg.c, "c", 1, "workers (keepalive, newconn)")
	flag.IntVar(&cfg.n, "n", 5_000_000, "at most this many measured requests (idle: connections to hold)")
	flag.DurationVar(&cfg.duration, "d", 10*time.Second, "measured duration (setup, idle: time bound of a pass)")
	flag.DurationVar(&cfg.warmup, "warmup", time.Second, "unmeasured requests first (keepalive, newconn)")
	flag.DurationVar(&cfg.timeout, "timeout", 300*time.Second, "hard deadline of the whole process (exit 4)")
	flag.DurationVar(&cfg.reqTimeout, "req-timeout", 30*time.Second, "per request")
	flag.DurationVar(&cfg.dialTimeout, "dial-timeout", 10*time.Second, "per TCP connect")
	flag.Int64Var(&cfg.size, "size", 256<<20, "bytes (download: expected, upload: sent)")
	flag.StringVar(&cfg.namesFmt, "names-fmt", "h%03d.bench.test", "setup: host name format")
	flag.IntVar(&cfg.names, "names", 200, "setup: host names")
	flag.IntVar(&cfg.passes, "passes", 2, "setup: passes over the names (first: cold)")
	flag.IntVar(&cfg.idleWarm, "idle-warm", 20, "idle: connections opened and closed first")
	flag.DurationVar(&cfg.idleHold, "idle-hold", 120*time.Second, "idle: longest wait for a line on stdin")
	flag.BoolVar(&cfg.resume, "resume", false, "resume TLS sessions (one client session cache for all workers)")
	flag.Parse()
	if cfg.resume {
		sessions = tls.NewLRUClientSessionCache(1024)
	}

	if cfg.caFile == "" {
		fmt.Fprintln(os.Stderr, "loadgen: -ca is required")
		os.Exit(2)
	}
	pem, err := os.ReadFile(cfg.caFile)
	if err != nil {
		fmt.Fprintln(os.Stderr, "loadgen:", err)
		os.Exit(2)
	}
	roots = x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		fmt.Fprintln(os.Stderr, "loadgen: no certificate in", cfg.caFile)
		os.Exit(2)
	}
	if cfg.c < 1 || cfg.n < 1 {
		fmt.Fprintln(os.Stderr, "loadgen: -c and -n must be >= 1")
		os.Exit(2)
	}
	time.AfterFunc(cfg.timeout, func() {
		fmt.Fprintf(os.Stderr, "loadgen: hard deadline %s reached, exiting\n", cfg.timeout)
		os.Exit(4)
	})

	via := "direct"
	if cfg.proxy != "" {
		via = "proxy " + cfg.proxy
	}
	res := &result{Mode: cfg.mode, Via: via, Concurrency: cfg.c}
	switch cfg.mode {
	case "keepalive":
		runRequests(res, true)
	case "newconn":
		runRequests(res, false)
	case "download":
		runBulk(res, false)
	case "upload":
		runBulk(res, true)
	case "setup":
		runSetup(res)
	case "idle":
		runIdle(res)
	case "probe":
		runProbe(res)
	default:
		fmt.Fprintln(os.Stderr, "loadgen: unknown -mode", cfg.mode)
		os.Exit(2)
	}
	res.PeerCloses = atomic.LoadInt64(&peerCloses)
	res.CloseResps = atomic.LoadInt64(&closeResponses)
	out, _ := json.Marshal(res)
	fmt.Println(string(out))
	if res.Fail != "" {
		fmt.Fprintln(os.Stderr, "loadgen: FAIL:", res.Fail)
		os.Exit(3)
	}
}
