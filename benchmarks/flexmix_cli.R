# The command-line peer of `gatelab fit`: read a CSV with columns x and y, fit a
# k-expert Gaussian MoE with flexmix from its default start (random cluster labels,
# seeded), and print one JSON line: log-likelihood, iterations, converged, fit seconds.
# Usage: Rscript flexmix_cli.R data.csv k tolerance iter_max
suppressPackageStartupMessages(library(flexmix))
args <- commandArgs(trailingOnly = TRUE)
d <- read.csv(args[1])
set.seed(0)
t0 <- proc.time()[["elapsed"]]
fit <- flexmix(y ~ x, data = d, k = as.integer(args[2]), model = FLXMRglm(family = "gaussian"),
               concomitant = FLXPmultinom(~x),
               control = list(tolerance = as.numeric(args[3]), iter.max = as.integer(args[4])))
secs <- proc.time()[["elapsed"]] - t0
cat(sprintf('{"loglik": %.12f, "iter": %d, "converged": %s, "k": %d, "seconds": %.6f}\n',
            as.numeric(logLik(fit)), fit@iter, tolower(as.character(fit@converged)), fit@k, secs))
