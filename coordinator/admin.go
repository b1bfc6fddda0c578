package coordinator

import (
	"context"

	"github.com/signal-p2p/signal/protocol"
)

// createKey mints an API key and its account funded with the request's
// micro-credits. Only the key's hash is replicated: the key itself is
// answered once.
func (c *Coordinator) createKey(ctx context.Context, req protocol.CreateKeyRequest) (protocol.CreateKeyResponse, error) {
	amount, err := validateCreateKey(req)
	if err != nil {
		return protocol.CreateKeyResponse{}, err
	}
	key := newSecret("sk-sig-")
	acct := "acct_" + newID(8)
	rec := KeyRecord{Hash: hashSecret(key), Account: acct, Name: req.Name, CreatedAt: now()}
	if _, err := c.propose(ctx, cmdCreateKey, createKeyCmd{Key: rec, Credits: amount}); err != nil {
		return protocol.CreateKeyResponse{}, err
	}
	c.log.Info("api key created", "category", "security", "account", acct, "key", KeyID(rec), "micro_credits", amount)
	return protocol.CreateKeyResponse{APIKey: key, Account: acct, KeyID: KeyID(rec)}, nil
}

func keyView(k KeyRecord) protocol.Key {
	return protocol.Key{ID: KeyID(k), Account: k.Account, Name: k.Name, CreatedAt: k.CreatedAt}
}

// listKeys lists the API keys (of account, when set), never their secrets.
func (c *Coordinator) listKeys(account string) protocol.KeyList {
	out := protocol.KeyList{Keys: []protocol.Key{}}
	c.fsm.read(func(s *State) {
		for _, k := range s.Keys(account) {
			out.Keys = append(out.Keys, keyView(k))
		}
	})
	return out
}

// revokeKey deletes the key id names; its account and balance stay.
func (c *Coordinator) revokeKey(ctx context.Context, id string) (protocol.Key, error) {
	var k KeyRecord
	var ok bool
	c.fsm.read(func(s *State) { k, ok = s.KeyByID(id) })
	if !ok {
		return protocol.Key{}, protocol.UserErrorf(ErrNotFound, "key %q is unknown or already revoked: signal keys list shows the keys", id)
	}
	if _, err := c.propose(ctx, cmdRevokeKey, revokeKeyCmd{Hash: k.Hash}); err != nil {
		return protocol.Key{}, err
	}
	c.log.Info("api key revoked", "category", "security", "account", k.Account, "key", id)
	return keyView(k), nil
}

// credit mints the request's micro-credits into req.Account. The answer is
// recorded under idem with the mint itself, so a retry through a new leader
// credits once.
func (c *Coordinator) credit(ctx context.Context, req protocol.CreditRequest, idem *IdemTag) (IdemRecord, error) {
	amount, err := validateCredit(req)
	if err != nil {
		return IdemRecord{}, err
	}
	v, err := c.propose(ctx, cmdMint, mintCmd{Account: req.Account, Amount: amount, Idem: idem, Time: now()})
	if err != nil {
		return IdemRecord{}, err
	}
	c.log.Info("account credited", "category", "billing", "account", req.Account, "micro_credits", amount)
	return v.(IdemRecord), nil
}

// createJoinToken issues a join token whose nodes earn for
// req.OperatorAccount (a new operator account when empty).
func (c *Coordinator) createJoinToken(ctx context.Context, req protocol.JoinTokenRequest) (protocol.JoinTokenResponse, error) {
	if len(req.OperatorAccount) > maxNameLen {
		return protocol.JoinTokenResponse{}, protocol.UserErrorf(ErrInvalidRequest, "field operator_account: longer than %d characters", maxNameLen)
	}
	op := req.OperatorAccount
	if op == "" {
		op = "op_" + newID(8)
	}
	tok := newSecret("jt-")
	if _, err := c.propose(ctx, cmdCreateJoinToken, JoinTokenRecord{Hash: hashSecret(tok), Operator: op, CreatedAt: now()}); err != nil {
		return protocol.JoinTokenResponse{}, err
	}
	return protocol.JoinTokenResponse{JoinToken: tok, OperatorAccount: op}, nil
}
