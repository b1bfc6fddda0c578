package gpu

import (
	"bufio"
	"context"
	"embed"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/cenkalti/backoff/v4"

	"github.com/signal-p2p/signal/protocol"
)

// The worker's Python sources travel inside the binary so that a node
// needs only an interpreter with torch, not a checkout.
//
//go:embed worker/signal_worker/*.py
var workerFS embed.FS

// Health is the worker's answer to a health call.
type Health struct {
	Status      string   `json:"status"`
	Backend     string   `json:"backend"`
	Device      string   `json:"device"`
	Torch       string   `json:"torch"`
	Sessions    int      `json:"sessions"`
	Models      []string `json:"models"`
	ModelBytes  int64    `json:"model_bytes"`
	PID         int      `json:"pid"`
	GPUName     string   `json:"gpu_name,omitempty"`
	MemoryTotal int64    `json:"memory_total,omitempty"`
	MemoryFree  int64    `json:"memory_free,omitempty"`
}

// Supervisor runs one worker process: starts it, checks its health,
// restarts it with exponential backoff when it dies or stops answering, and
// shuts it down cleanly. Calls go over pooled unix-socket connections.
type Supervisor struct {
	cfg     Config
	log     *slog.Logger
	runDir  string
	ownDir  bool
	sock    string
	restart atomic.Int64

	mu         sync.Mutex
	generation int64  // increments on every successful start
	ready      bool   // a worker is up and answered health
	health     Health // last good health answer
	idle       []net.Conn
	readyCh    chan struct{} // closed while ready; replaced when not
	lastErr    error

	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// NewSupervisor checks cfg and prepares the run directory; Start launches the worker.
func NewSupervisor(cfg Config) (*Supervisor, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	s := &Supervisor{cfg: cfg, log: log.With("component", "gpu-worker", "device", cfg.Device),
		readyCh: make(chan struct{})}
	dir := cfg.RunDir
	if dir == "" {
		d, err := os.MkdirTemp("", "signal-gpu-")
		if err != nil {
			return nil, fmt.Errorf("gpu run dir: %w", err)
		}
		dir, s.ownDir = d, true
	}
	if err := extractWorker(filepath.Join(dir, "worker")); err != nil {
		return nil, err
	}
	s.runDir = dir
	// Unix socket paths are limited to ~108 bytes: keep the name short.
	s.sock = filepath.Join(dir, "w.sock")
	return s, nil
}

func extractWorker(dst string) error {
	return fs.WalkDir(workerFS, "worker", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel("worker", path)
		out := filepath.Join(dst, rel)
		if d.IsDir() {
			return os.MkdirAll(out, 0o755)
		}
		b, err := workerFS.ReadFile(path)
		if err != nil {
			return fmt.Errorf("extract worker %s: %w", path, err)
		}
		if err := os.WriteFile(out, b, 0o644); err != nil {
			return fmt.Errorf("extract worker %s: %w", path, err)
		}
		return nil
	})
}

// Start launches the supervision loop and waits until the worker first
// answers a health check (or StartTimeout passes). On error the loop keeps
// retrying in the background until Stop, so a node may start advertising
// later.
func (s *Supervisor) Start(ctx context.Context) error {
	loopCtx, cancel := context.WithCancel(context.Background())
	s.cancel = cancel
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		s.loop(loopCtx)
	}()
	wait, cancelWait := context.WithTimeout(ctx, s.cfg.StartTimeout)
	defer cancelWait()
	if err := s.waitReady(wait); err != nil {
		s.mu.Lock()
		last := s.lastErr
		s.mu.Unlock()
		if last != nil {
			return fmt.Errorf("start gpu worker: %w: %w", ErrUnavailable, last)
		}
		return fmt.Errorf("start gpu worker: %w: %w", ErrUnavailable, err)
	}
	return nil
}

// Stop shuts the worker down (a shutdown call, then SIGKILL after
// StopTimeout), waits for every goroutine and removes a temporary run dir.
func (s *Supervisor) Stop() error {
	if s.cancel != nil {
		s.cancel()
	}
	s.wg.Wait()
	if s.ownDir {
		return os.RemoveAll(s.runDir)
	}
	return nil
}

// Ready reports whether a worker is up.
func (s *Supervisor) Ready() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.ready
}

// Generation counts successful worker starts; it changes when a restart
// has dropped every session.
func (s *Supervisor) Generation() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.generation
}

// Restarts counts worker starts after the first.
func (s *Supervisor) Restarts() int64 { return s.restart.Load() }

// LastHealth returns the last good health answer and whether the worker is up.
func (s *Supervisor) LastHealth() (Health, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.health, s.ready
}

// Health asks the worker now (LastHealth is the periodic check's answer).
func (s *Supervisor) Health(ctx context.Context) (Health, error) {
	if !s.Ready() {
		return Health{}, fmt.Errorf("%w: worker on %s is not running", ErrUnavailable, s.cfg.Device)
	}
	return s.healthCall(ctx)
}

func (s *Supervisor) waitReady(ctx context.Context) error {
	s.mu.Lock()
	ch := s.readyCh
	s.mu.Unlock()
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (s *Supervisor) setReady(ok bool, h Health) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if ok == s.ready {
		if ok {
			s.health = h
		}
		return
	}
	s.ready = ok
	if ok {
		s.health = h
		s.generation++
		close(s.readyCh)
		return
	}
	s.readyCh = make(chan struct{})
	for _, c := range s.idle {
		c.Close()
	}
	s.idle = nil
}

// loop starts the worker, watches it and restarts it until ctx ends.
func (s *Supervisor) loop(ctx context.Context) {
	bo := backoff.NewExponentialBackOff()
	bo.InitialInterval = s.cfg.InitialBackoff
	bo.MaxInterval = s.cfg.MaxBackoff
	bo.MaxElapsedTime = 0 // never give up while the node runs
	first := true
	for ctx.Err() == nil {
		if !first {
			s.restart.Add(1)
		}
		first = false
		up, err := s.runOnce(ctx)
		if ctx.Err() != nil {
			return
		}
		if up {
			bo.Reset()
		}
		s.mu.Lock()
		s.lastErr = err
		s.mu.Unlock()
		delay := bo.NextBackOff()
		s.log.Warn("gpu worker exited; restarting", "err", err, "in", delay)
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

// runOnce runs one worker process until it exits, fails its health checks
// or ctx ends (then shuts it down). up reports whether it became ready.
func (s *Supervisor) runOnce(ctx context.Context) (up bool, err error) {
	args := []string{"-u", "-m", "signal_worker", "--socket", s.sock, "--device", s.cfg.Device}
	if s.cfg.DType != "" {
		args = append(args, "--dtype", s.cfg.DType)
	}
	if s.cfg.Threads > 0 {
		args = append(args, "--threads", strconv.Itoa(s.cfg.Threads))
	}
	cmd := exec.Command(s.cfg.Python, args...)
	cmd.Dir = filepath.Join(s.runDir, "worker")
	cmd.Env = append(os.Environ(), "PYTHONDONTWRITEBYTECODE=1")
	// Its own process group: a ^C at the terminal reaches the node, which
	// then shuts the worker down in order instead of both dying at once.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return false, fmt.Errorf("worker stdout: %w", err)
	}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return false, fmt.Errorf("worker stderr: %w", err)
	}
	_ = os.Remove(s.sock)
	if err := cmd.Start(); err != nil {
		return false, fmt.Errorf("start %s: %w", s.cfg.Python, err)
	}
	var pipes sync.WaitGroup
	listening := make(chan struct{}, 1)
	pipes.Add(2)
	go func() {
		defer pipes.Done()
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			var ev struct{ Event, Message string }
			if json.Unmarshal(sc.Bytes(), &ev) == nil && ev.Event == "listening" {
				select {
				case listening <- struct{}{}:
				default:
				}
			}
			s.log.Info("worker", "out", sc.Text())
		}
	}()
	go func() {
		defer pipes.Done()
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			s.log.Warn("worker", "stderr", sc.Text())
		}
	}()
	exited := make(chan error, 1)
	go func() {
		pipes.Wait() // Wait must follow the pipe readers' EOF.
		exited <- cmd.Wait()
	}()
	defer s.setReady(false, Health{})

	start := time.NewTimer(s.cfg.StartTimeout)
	defer start.Stop()
	select {
	case <-listening:
	case err := <-exited:
		return false, fmt.Errorf("worker exited while starting: %v", err)
	case <-start.C:
		s.kill(cmd, exited)
		return false, fmt.Errorf("worker did not listen within %s", s.cfg.StartTimeout)
	case <-ctx.Done():
		s.kill(cmd, exited)
		return false, ctx.Err()
	}
	h, err := s.healthCall(ctx)
	if err != nil {
		s.kill(cmd, exited)
		return false, fmt.Errorf("first health check: %w", err)
	}
	s.setReady(true, h)
	s.log.Info("gpu worker ready", "backend", h.Backend, "torch", h.Torch, "pid", h.PID)

	tick := time.NewTicker(s.cfg.HealthInterval)
	defer tick.Stop()
	fails := 0
	for {
		select {
		case err := <-exited:
			return true, fmt.Errorf("worker exited: %v", err)
		case <-ctx.Done():
			s.shutdown(cmd, exited)
			return true, ctx.Err()
		case <-tick.C:
			h, err := s.healthCall(ctx)
			if err == nil {
				fails = 0
				s.setReady(true, h)
				continue
			}
			fails++
			s.log.Warn("gpu worker health check failed", "err", err, "consecutive", fails)
			if fails >= s.cfg.HealthFailures {
				s.kill(cmd, exited)
				return true, fmt.Errorf("worker failed %d health checks: %w", fails, err)
			}
		}
	}
}

func (s *Supervisor) healthCall(ctx context.Context) (Health, error) {
	hctx, cancel := context.WithTimeout(ctx, s.cfg.HealthTimeout)
	defer cancel()
	resp, err := s.roundTrip(hctx, protocol.SessionRequest{RequestID: "health", Call: "health"})
	if err != nil {
		return Health{}, err
	}
	if resp.Error != nil {
		return Health{}, fmt.Errorf("health: %s: %s", resp.Error.Code, resp.Error.Message)
	}
	var h Health
	if err := json.Unmarshal(resp.Body, &h); err != nil {
		return Health{}, fmt.Errorf("health: decode: %w", err)
	}
	if h.Status != "ok" {
		return h, fmt.Errorf("health: status %q", h.Status)
	}
	return h, nil
}

// shutdown asks the worker to exit, then kills it after StopTimeout.
func (s *Supervisor) shutdown(cmd *exec.Cmd, exited chan error) {
	sctx, cancel := context.WithTimeout(context.Background(), s.cfg.StopTimeout)
	defer cancel()
	if _, err := s.roundTrip(sctx, protocol.SessionRequest{RequestID: "shutdown", Call: "shutdown"}); err != nil {
		_ = cmd.Process.Signal(syscall.SIGTERM)
	}
	select {
	case <-exited:
	case <-sctx.Done():
		s.kill(cmd, exited)
	}
}

func (s *Supervisor) kill(cmd *exec.Cmd, exited chan error) {
	_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	<-exited
}

// Call sends one request to the worker and returns its answer. A worker
// that is not up yields ErrUnavailable at once; ctx cancels the wait.
func (s *Supervisor) Call(ctx context.Context, req protocol.SessionRequest) (protocol.SessionResponse, error) {
	if !s.Ready() {
		return protocol.SessionResponse{}, fmt.Errorf("%w: worker on %s is not running", ErrUnavailable, s.cfg.Device)
	}
	resp, err := s.roundTrip(ctx, req)
	if err != nil {
		return resp, fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	return resp, nil
}

func (s *Supervisor) roundTrip(ctx context.Context, req protocol.SessionRequest) (protocol.SessionResponse, error) {
	var resp protocol.SessionResponse
	c, err := s.conn(ctx)
	if err != nil {
		return resp, err
	}
	// A cancelled ctx unblocks the read by expiring the deadline; the
	// connection is then dropped (its answer would arrive late).
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Now()) })
	err = protocol.WriteFrame(c, protocol.MsgSessionRequest, req)
	var payload []byte
	if err == nil {
		var t protocol.MsgType
		t, payload, err = protocol.ReadFrame(c, 0)
		if err == nil && t != protocol.MsgSessionResponse {
			err = fmt.Errorf("%w: %s", protocol.ErrUnexpectedMsgType, t)
		}
	}
	if !stop() || err != nil {
		c.Close()
		if ctx.Err() != nil {
			return resp, ctx.Err()
		}
		return resp, fmt.Errorf("worker call %s: %w", req.Call, err)
	}
	if err := json.Unmarshal(payload, &resp); err != nil {
		c.Close()
		return resp, fmt.Errorf("worker call %s: decode answer: %w", req.Call, err)
	}
	s.put(c)
	return resp, nil
}

func (s *Supervisor) conn(ctx context.Context) (net.Conn, error) {
	s.mu.Lock()
	if n := len(s.idle); n > 0 {
		c := s.idle[n-1]
		s.idle = s.idle[:n-1]
		s.mu.Unlock()
		return c, nil
	}
	s.mu.Unlock()
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", s.sock)
	if err != nil {
		return nil, fmt.Errorf("dial worker: %w", err)
	}
	return c, nil
}

// put returns a connection to the pool (a few idle ones are enough: the
// worker computes one call at a time).
func (s *Supervisor) put(c net.Conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.ready || len(s.idle) >= 8 {
		c.Close()
		return
	}
	s.idle = append(s.idle, c)
}

// errWorker turns a worker's error answer into an error wrapping the sentinel of its code.
func errWorker(call protocol.Call, e *protocol.ErrorBody) error {
	var base error
	switch e.Code {
	case protocol.CodeInvalidRequest, protocol.CodeTooLarge:
		base = ErrInvalidInput
	case protocol.CodeNotFound:
		base = ErrNotFound
	case protocol.CodeUnavailable:
		base = ErrUnavailable
	case protocol.CodeOutOfMemory:
		base = ErrOutOfMemory
	default:
		base = ErrInternal
	}
	return fmt.Errorf("%s: %w: %s", call, base, e.Message)
}
