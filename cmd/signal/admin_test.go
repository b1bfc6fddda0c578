package main

import (
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/signal-p2p/signal/protocol"
)

// fakeAdminAPI answers the admin calls with the admin token "adm",
// recording each body.
type fakeAdminAPI struct {
	*httptest.Server
	mu     sync.Mutex
	bodies map[string][]string
}

func newFakeAdminAPI(t *testing.T) *fakeAdminAPI {
	t.Helper()
	f := &fakeAdminAPI{bodies: map[string][]string{}}
	f.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		f.mu.Lock()
		f.bodies[r.URL.Path] = append(f.bodies[r.URL.Path], string(b))
		f.mu.Unlock()
		if r.Header.Get("Authorization") != "Bearer adm" {
			w.WriteHeader(403)
			_ = json.NewEncoder(w).Encode(protocol.ErrorResponse{Error: protocol.ErrorBody{Code: "forbidden", Message: "this is an admin call: send the admin token, not an API key"}})
			return
		}
		var v any
		switch r.URL.Path {
		case "/v1/admin/keys":
			if r.Method == http.MethodGet {
				v = protocol.KeyList{Keys: []protocol.Key{
					{ID: "key_1", Account: "acct-1", Name: "alice", CreatedAt: "2026-01-01T00:00:00Z"},
					{ID: "key_2", Account: r.URL.Query().Get("account"), CreatedAt: "2026-01-02T00:00:00Z"}}}
				break
			}
			v = protocol.CreateKeyResponse{APIKey: "sk-new", Account: "acct-1", KeyID: "key_1"}
		case "/v1/admin/credit":
			var req protocol.CreditRequest
			_ = json.Unmarshal(b, &req)
			v = protocol.CreditResponse{Account: req.Account, BalanceMicroCredits: 1_000_000 + req.MicroCredits}
		case "/v1/admin/keys/key_1":
			v = protocol.Key{ID: "key_1", Account: "acct-1"}
		case "/v1/admin/join_tokens":
			v = protocol.JoinTokenResponse{JoinToken: "jt-1", OperatorAccount: "op-1"}
		default:
			w.WriteHeader(500)
			_ = json.NewEncoder(w).Encode(protocol.ErrorResponse{Error: protocol.ErrorBody{Code: "internal", Message: "internal error (request id 1)"}})
			return
		}
		_ = json.NewEncoder(w).Encode(v)
	}))
	t.Cleanup(f.Close)
	return f
}

func (f *fakeAdminAPI) last(path string) string {
	f.mu.Lock()
	defer f.mu.Unlock()
	bs := f.bodies[path]
	if len(bs) == 0 {
		return ""
	}
	return bs[len(bs)-1]
}

// TestAdminCommandsCredits: --credits is a decimal number of credits on
// every admin command, sent as the API's micro_credits; the admin commands
// find the coordinator and the token in --url, a testnet file or its
// directory, or $SIGNAL_TESTNET.
func TestAdminCommandsCredits(t *testing.T) {
	api := newFakeAdminAPI(t)
	t.Setenv("SIGNAL_URL", "")
	t.Setenv("SIGNAL_TESTNET", "")
	t.Setenv("SIGNAL_ADMIN_TOKEN", "adm")
	out, err := runCLI(t, "keys", "create", "--url", api.URL, "--credits", "0.5", "--name", "alice")
	if err != nil || !strings.Contains(out, "api_key sk-new") || !strings.Contains(out, "balance 0.500000 credits") {
		t.Fatalf("keys create: %q, %v", out, err)
	}
	if got := api.last("/v1/admin/keys"); got != `{"micro_credits":500000,"name":"alice"}` {
		t.Errorf("keys create sent %s", got)
	}
	out, err = runCLI(t, "credit", "--url", api.URL, "--account", "acct-1", "--credits", "12")
	if err != nil || !strings.Contains(out, "account acct-1 credited 12.000000 credits; balance 13.000000 credits") {
		t.Fatalf("credit: %q, %v", out, err)
	}
	if got := api.last("/v1/admin/credit"); got != `{"account":"acct-1","micro_credits":12000000}` {
		t.Errorf("credit sent %s", got)
	}

	out, err = runCLI(t, "keys", "list", "--url", api.URL, "--account", "acct-2", "--limit", "1")
	if err != nil || !strings.Contains(out, "key_2") || strings.Contains(out, "key_1") || !strings.Contains(out, "(1 older keys not shown") {
		t.Fatalf("keys list: %q, %v", out, err)
	}
	out, err = runCLI(t, "keys", "revoke", "key_1", "--url", api.URL)
	if err != nil || !strings.Contains(out, "key key_1 of account acct-1 revoked") {
		t.Fatalf("keys revoke: %q, %v", out, err)
	}

	// A testnet directory (or its file, or $SIGNAL_TESTNET) gives the URL
	// and the admin token.
	t.Setenv("SIGNAL_ADMIN_TOKEN", "")
	dir := t.TempDir()
	data, _ := json.Marshal(map[string]any{"coordinators": []string{api.URL}, "api_key": "sk", "admin_token": "adm"})
	if err := os.WriteFile(filepath.Join(dir, "testnet.json"), data, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"node", "token", "create", "--testnet", dir},
		{"node", "token", "create", "--testnet", filepath.Join(dir, "testnet.json")},
		{"credit", "--testnet", dir, "--account", "a", "--credits", "1"},
	} {
		if out, err := runCLI(t, args...); err != nil {
			t.Errorf("signal %v: %q, %v", args, out, err)
		}
	}
	t.Setenv("SIGNAL_TESTNET", dir)
	if out, err := runCLI(t, "keys", "create", "--credits", "3"); err != nil || !strings.Contains(out, "sk-new") {
		t.Errorf("keys create with $SIGNAL_TESTNET: %q, %v", out, err)
	}
}

// TestExitStatuses: a usage mistake, a refusal, a server failure and an
// unreachable coordinator end with distinct statuses.
func TestExitStatuses(t *testing.T) {
	api := newFakeAdminAPI(t)
	users := fakeUserAPI(t, "k")
	t.Setenv("SIGNAL_URL", "")
	t.Setenv("SIGNAL_TESTNET", "")
	t.Setenv("SIGNAL_API_KEY", "")
	t.Setenv("SIGNAL_ADMIN_TOKEN", "")
	for _, tc := range []struct {
		args []string
		want int
	}{
		{[]string{"runs", "show"}, exitUsage},                                     // missing argument
		{[]string{"runs", "list", "--bogus"}, exitUsage},                          // unknown flag
		{[]string{"nosuchcommand"}, exitUsage},                                    // unknown command
		{[]string{"runs", "list"}, exitUsage},                                     // no URL
		{[]string{"credit", "--url", api.URL, "--admin-token", "adm"}, exitUsage}, // no --account
		{[]string{"keys", "create", "--url", api.URL, "--credits", "1.0000001", "--admin-token", "adm"}, exitUsage},
		{[]string{"keys", "create", "--url", api.URL, "--admin-token", "wrong"}, exitRefused},
		{[]string{"runs", "show", "nope", "--url", users.URL, "--api-key", "k"}, exitRefused},
		{[]string{"runs", "list", "--url", users.URL, "--api-key", "k"}, exitOK},
		{[]string{"credit", "--url", deadURL(t), "--admin-token", "adm", "--account", "a", "--credits", "1", "--timeout", "2s"}, exitUnreachable},
	} {
		_, err := runCLI(t, tc.args...)
		if got := exitStatus(err); got != tc.want {
			t.Errorf("signal %v: exit %d (%v), want %d", tc.args, got, err, tc.want)
		}
	}
	// A 5xx answer.
	broken := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(500)
		_ = json.NewEncoder(w).Encode(protocol.ErrorResponse{Error: protocol.ErrorBody{Code: "internal", Message: "internal error (request id 1)"}})
	}))
	defer broken.Close()
	if _, err := runCLI(t, "models", "--url", broken.URL, "--api-key", "k"); exitStatus(err) != exitServerError {
		t.Errorf("a 500: exit %d (%v), want %d", exitStatus(err), err, exitServerError)
	}
	if got := exitStatus(&ranError{errors.New("x")}); got != exitFailure {
		t.Errorf("a plain failure: exit %d", got)
	}
}

// deadURL is a loopback address nothing listens on.
func deadURL(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	_ = ln.Close()
	return "http://" + addr
}
