// Command pause is the sandbox image of the local cluster's real nodes: it
// holds a pod's namespaces open, doing nothing, until it is told to stop.
// No registry is reachable from the test bed, so the usual pause image is
// replaced by this one, built from source like every other component.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	<-stop
}
