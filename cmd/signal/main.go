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
	cmd, err := newRootCmd().ExecuteContextC(ctx)
	stop()
	status := exitStatus(err)
	if err != nil {
		fmt.Fprintln(os.Stderr, "signal:", err)
		switch status {
		case exitUsage:
			fmt.Fprint(os.Stderr, "\n", cmd.UsageString())
		case exitUnreachable:
			fmt.Fprintln(os.Stderr, "signal: no coordinator answered: is it running, and do --url, --testnet or $SIGNAL_URL name it?")
		}
	}
	os.Exit(status)
}
