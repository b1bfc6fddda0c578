package coordinator

import (
	"strings"
	"testing"

	"github.com/signal-p2p/signal/protocol"
)

// TestAPIMoneyNames: admin requests take the amount under its name with
// the unit or the deprecated one (not two that disagree), and every answer
// carries each amount under both names, for one release.
func TestAPIMoneyNames(t *testing.T) {
	c, _ := startOne(t, nil)
	base := c.URL()
	for _, tc := range []struct {
		body   string
		status int
		want   string
	}{
		{`{"micro_credits": 5000000}`, 200, ""},
		{`{"credits": 5000000}`, 200, ""},
		{`{"micro_credits": 5000000, "credits": 5000000}`, 200, ""},
		{`{"micro_credits": 5000000, "credits": 6}`, 400, "micro_credits 5000000 and credits 6 disagree: send micro_credits alone (credits is its deprecated name)"},
		{`{"micro_credits": -1}`, 400, "micro_credits -1 is out of range: use 0..9007199254740992 (9007199254.740992 credits)"},
	} {
		r := do(t, "POST", base+"/v1/admin/keys", testAdmin, tc.body)
		mustStatus(t, r, tc.status)
		if tc.want != "" && r.errMessage(t) != tc.want {
			t.Errorf("%s: message %q, want %q", tc.body, r.errMessage(t), tc.want)
		}
	}
	key, acct := createKey(t, base, 5_000_000)
	for _, body := range []string{`{"account": "` + acct + `", "micro_credits": 1000000}`, `{"account": "` + acct + `", "amount": 1000000}`} {
		r := do(t, "POST", base+"/v1/admin/credit", testAdmin, body)
		mustStatus(t, r, 200)
		for _, k := range []string{`"balance_micro_credits":`, `"balance":`} {
			if !strings.Contains(string(r.body), k) {
				t.Errorf("credit answer %s lacks %s", r.body, k)
			}
		}
	}
	r := do(t, "POST", base+"/v1/admin/credit", testAdmin, `{"account": "`+acct+`", "micro_credits": 1, "amount": 2}`)
	mustStatus(t, r, 400)

	run := createRun(t, base, key, map[string]any{"base_model": "tiny"})
	fb := do(t, "POST", base+"/v1/runs/"+run.ID+"/forward_backward", key, fbBody(10))
	mustStatus(t, fb, 200)
	for path, keys := range map[string][]string{
		"fb":                 {`"balance_micro_credits":`, `"balance":`, `"micro_credits":10`, `"credits":10`},
		"/v1/account":        {`"balance_micro_credits":`, `"spent_micro_credits":10`, `"balance":`, `"spent":10`},
		"/v1/runs/" + run.ID: {`"spent_micro_credits":10`, `"spent":10`},
		"/v1/models":         {`"train_micro_credits_per_1k":1000`, `"train_per_1k":1000`},
	} {
		got := fb
		if path != "fb" {
			got = do(t, "GET", base+path, key, nil)
			mustStatus(t, got, 200)
		}
		for _, k := range keys {
			if !strings.Contains(string(got.body), k) {
				t.Errorf("%s answer %s lacks %s", path, got.body, k)
			}
		}
	}
	var acc protocol.Account
	do(t, "GET", base+"/v1/account", key, nil).decode(t, &acc)
	if acc.BalanceMicroCredits != 7_000_000-10 || acc.SpentMicroCredits != 10 || len(acc.Charges) != 1 || acc.Charges[0].MicroCredits != 10 {
		t.Fatalf("account %+v", acc)
	}
}

// TestAPIKeysListAndRevoke: the admin lists keys (ids, never secrets) and
// revokes one; the revoked key is refused from then on, on every member's
// view, and its account's balance stays.
func TestAPIKeysListAndRevoke(t *testing.T) {
	c, _ := startOne(t, nil)
	base := c.URL()
	r := do(t, "POST", base+"/v1/admin/keys", testAdmin, protocol.CreateKeyRequest{MicroCredits: 5, Name: "alice"})
	mustStatus(t, r, 200)
	var alice protocol.CreateKeyResponse
	r.decode(t, &alice)
	bobKey, bobAcct := createKey(t, base, 7)
	if !strings.HasPrefix(alice.KeyID, "key_") {
		t.Fatalf("create answer %+v names no key id", alice)
	}
	var list protocol.KeyList
	r = do(t, "GET", base+"/v1/admin/keys", testAdmin, nil)
	mustStatus(t, r, 200)
	r.decode(t, &list)
	if len(list.Keys) != 2 || list.Keys[0].ID != alice.KeyID || list.Keys[0].Name != "alice" || strings.Contains(string(r.body), alice.APIKey) {
		t.Fatalf("keys %s", r.body)
	}
	r = do(t, "GET", base+"/v1/admin/keys?account="+bobAcct, testAdmin, nil)
	r.decode(t, &list)
	if len(list.Keys) != 1 || list.Keys[0].Account != bobAcct {
		t.Fatalf("bob's keys %s", r.body)
	}
	mustStatus(t, do(t, "GET", base+"/v1/admin/keys", bobKey, nil), 403)

	mustStatus(t, do(t, "GET", base+"/v1/account", alice.APIKey, nil), 200)
	r = do(t, "DELETE", base+"/v1/admin/keys/"+alice.KeyID, testAdmin, nil)
	mustStatus(t, r, 200)
	r = do(t, "GET", base+"/v1/account", alice.APIKey, nil)
	mustStatus(t, r, 401)
	r = do(t, "DELETE", base+"/v1/admin/keys/"+alice.KeyID, testAdmin, nil)
	mustStatus(t, r, 404)
	if msg := r.errMessage(t); !strings.Contains(msg, "signal keys list") {
		t.Fatalf("message %q", msg)
	}
	// The account stays: a new key can be made for it by crediting it.
	mustStatus(t, do(t, "POST", base+"/v1/admin/credit", testAdmin, protocol.CreditRequest{Account: alice.Account, MicroCredits: 1}), 200)
	c.fsm.read(func(s *State) {
		if _, ok := s.KeyByID(alice.KeyID); ok {
			t.Error("revoked key still in the state")
		}
	})
}
