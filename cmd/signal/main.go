// Command signal is Signal's one binary: coordinator, node daemon, local
// testnet, model tools and the user's CLI, as subcommands.
//
// main only wires the command tree and runs it under signal.NotifyContext so
// that every subcommand sees Ctrl-C as a cancelled context.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := newRootCmd().ExecuteContext(ctx)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "signal:", err)
		os.Exit(1)
	}
}
