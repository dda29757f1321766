{{/* Names: every object is "<release>-bgremove-<component>" unless overridden; 63 characters at most. */}}
{{- define "bgremove.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "bgremove.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Component names leave room for the suffix a Deployment adds to its pods. */}}
{{- define "bgremove.gateway.fullname" -}}
{{- printf "%s-gateway" (include "bgremove.fullname" . | trunc 45 | trimSuffix "-") }}
{{- end }}

{{- define "bgremove.triton.fullname" -}}
{{- printf "%s-triton" (include "bgremove.fullname" . | trunc 45 | trimSuffix "-") }}
{{- end }}

{{- define "bgremove.triton.headless" -}}
{{- printf "%s-headless" (include "bgremove.triton.fullname" .) }}
{{- end }}

{{- define "bgremove.gateway.metricsService" -}}
{{- printf "%s-metrics" (include "bgremove.gateway.fullname" .) }}
{{- end }}

{{- define "bgremove.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels. Call with (dict "ctx" $ "component" "gateway"). */}}
{{- define "bgremove.selectorLabels" -}}
app.kubernetes.io/name: {{ include "bgremove.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "bgremove.labels" -}}
helm.sh/chart: {{ include "bgremove.chart" .ctx }}
{{ include "bgremove.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: bgremove
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* repository:tag or repository@digest. Call with (dict "image" .Values.x.image "default" "tag"). */}}
{{- define "bgremove.image" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (default .default .image.tag) -}}
{{- end -}}
{{- end }}

{{- define "bgremove.gateway.serviceAccountName" -}}
{{- if .Values.gateway.serviceAccount.create }}
{{- default (include "bgremove.gateway.fullname" .) .Values.gateway.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.gateway.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "bgremove.triton.serviceAccountName" -}}
{{- if .Values.triton.serviceAccount.create }}
{{- default (include "bgremove.triton.fullname" .) .Values.triton.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.triton.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "bgremove.gateway.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "bgremove.gateway.fullname" .)) .Values.gateway.tls.existingSecret }}
{{- end }}

{{- define "bgremove.triton.adminKeySecretName" -}}
{{- default (printf "%s-admin-key" (include "bgremove.triton.fullname" .)) .Values.triton.adminKey.existingSecret }}
{{- end }}

{{/* Where the gateway finds the Triton admin key (a file from the Secret, never an argument). */}}
{{- define "bgremove.triton.adminKeyPath" -}}
{{- printf "/etc/bgremove/triton-admin/%s" .Values.triton.adminKey.existingSecretKey }}
{{- end }}

{{- define "bgremove.gateway.apiKeysSecretName" -}}
{{- default (printf "%s-api-keys" (include "bgremove.gateway.fullname" .)) .Values.gateway.auth.existingSecret }}
{{- end }}

{{/* The address the gateway dials: the headless Service, resolved by the gateway to every Triton pod. */}}
{{- define "bgremove.triton.url" -}}
{{- printf "%s.%s.svc.%s:%d" (include "bgremove.triton.headless" .) .Release.Namespace .Values.clusterDomain (int .Values.triton.ports.grpc) }}
{{- end }}

{{/*
Spread and anti-affinity for one workload. Call with (dict "ctx" $ "component" "gateway" "cfg" .Values.gateway).
pod-template-hash in matchLabelKeys makes the spread count only pods of the same revision, so a
rolling update cannot be blocked by the old ReplicaSet's pods.
*/}}
{{- define "bgremove.spread" -}}
topologySpreadConstraints:
  - topologyKey: topology.kubernetes.io/zone
    maxSkew: {{ .cfg.topologySpread.zone.maxSkew }}
    whenUnsatisfiable: {{ .cfg.topologySpread.zone.whenUnsatisfiable }}
    nodeAffinityPolicy: {{ .cfg.topologySpread.zone.nodeAffinityPolicy }}
    nodeTaintsPolicy: {{ .cfg.topologySpread.zone.nodeTaintsPolicy }}
    labelSelector:
      matchLabels:
        {{- include "bgremove.selectorLabels" . | nindent 8 }}
    matchLabelKeys:
      - pod-template-hash
  - topologyKey: kubernetes.io/hostname
    maxSkew: {{ .cfg.topologySpread.hostname.maxSkew }}
    whenUnsatisfiable: {{ .cfg.topologySpread.hostname.whenUnsatisfiable }}
    nodeAffinityPolicy: {{ .cfg.topologySpread.hostname.nodeAffinityPolicy }}
    nodeTaintsPolicy: {{ .cfg.topologySpread.hostname.nodeTaintsPolicy }}
    labelSelector:
      matchLabels:
        {{- include "bgremove.selectorLabels" . | nindent 8 }}
    matchLabelKeys:
      - pod-template-hash
{{- if eq .cfg.podAntiAffinity "soft" }}
affinity:
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          topologyKey: kubernetes.io/hostname
          labelSelector:
            matchLabels:
              {{- include "bgremove.selectorLabels" . | nindent 14 }}
{{- else if eq .cfg.podAntiAffinity "hard" }}
affinity:
  podAntiAffinity:
    requiredDuringSchedulingIgnoredDuringExecution:
      - topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "bgremove.selectorLabels" . | nindent 12 }}
{{- end }}
{{- end }}

{{/*
A securityContext from values (restricted by default: https://kubernetes.io/docs/concepts/security/pod-security-standards/).
Call with (dict "ctx" $ "sc" .Values.gateway.podSecurityContext). With openshift: true the ids are
left out, so the restricted-v2 SCC can assign the namespace's own.
*/}}
{{- define "bgremove.securityContext" -}}
{{- $sc := deepCopy (default (dict) .sc) }}
{{- if .ctx.Values.openshift }}
{{- $sc = omit $sc "runAsUser" "runAsGroup" "fsGroup" }}
{{- end }}
{{- toYaml $sc }}
{{- end }}

{{/*
--workers: gateway.workers, or the CPU request rounded up to whole cores ("500m" -> 1, "2" -> 2,
"2500m" -> 3), at least 1. A pod without a CPU request gets 1.
*/}}
{{- define "bgremove.gateway.workers" -}}
{{- $g := .Values.gateway }}
{{- if $g.workers }}
{{- int $g.workers }}
{{- else }}
{{- $cpu := toString (dig "requests" "cpu" "1" $g.resources) }}
{{- $cores := 0.0 }}
{{- if hasSuffix "m" $cpu }}
{{- $cores = divf (trimSuffix "m" $cpu | float64) 1000 }}
{{- else }}
{{- $cores = float64 $cpu }}
{{- end }}
{{- max 1 (ceil $cores | int) }}
{{- end }}
{{- end }}

{{/* Shared per-key limits through Redis: on when a URL or a Secret holding one is given. */}}
{{- define "bgremove.gateway.redisEnabled" -}}
{{- $r := .Values.gateway.limits.redis }}
{{- if or $r.url $r.existingSecret }}true{{ end }}
{{- end }}

{{- define "bgremove.gateway.redisSecretName" -}}
{{- default (printf "%s-limits-redis" (include "bgremove.gateway.fullname" .)) .Values.gateway.limits.redis.existingSecret }}
{{- end }}

{{/* --limits-replicas: what each gateway divides a key's limits by while Redis does not answer. */}}
{{- define "bgremove.gateway.limitsReplicas" -}}
{{- $g := .Values.gateway }}
{{- if $g.limits.replicas }}
{{- int $g.limits.replicas }}
{{- else if $g.autoscaling.enabled }}
{{- int $g.autoscaling.maxReplicas }}
{{- else }}
{{- int $g.replicaCount }}
{{- end }}
{{- end }}

{{/* Labels of the `helm test` pod, which the gateway's NetworkPolicy admits. */}}
{{- define "bgremove.test.selectorLabels" -}}
{{- include "bgremove.selectorLabels" (dict "ctx" . "component" "test") }}
{{- end }}

{{/*
Checks JSON Schema cannot express because they relate two values. A failed install is better than
a PodDisruptionBudget that blocks every node drain or a grace period that kills in-flight requests.
*/}}
{{- define "bgremove.validate" -}}
{{- $g := .Values.gateway }}
{{- $t := .Values.triton }}
{{- if le (int $g.terminationGracePeriodSeconds) (add (int $g.preStopSleepSeconds) (int $g.drainSeconds)) }}
{{- fail (printf "gateway.terminationGracePeriodSeconds (%d) must be greater than gateway.preStopSleepSeconds (%d) + gateway.drainSeconds (%d), or Kubernetes kills the gateway before in-flight requests finish" (int $g.terminationGracePeriodSeconds) (int $g.preStopSleepSeconds) (int $g.drainSeconds)) }}
{{- end }}
{{- if le (int $t.terminationGracePeriodSeconds) (add (int $t.preStopSleepSeconds) (int $t.exitTimeoutSeconds)) }}
{{- fail (printf "triton.terminationGracePeriodSeconds (%d) must be greater than triton.preStopSleepSeconds (%d) + triton.exitTimeoutSeconds (%d), or Kubernetes kills Triton before in-flight requests finish" (int $t.terminationGracePeriodSeconds) (int $t.preStopSleepSeconds) (int $t.exitTimeoutSeconds)) }}
{{- end }}
{{- range $component, $cfg := dict "gateway" $g "triton" $t }}
{{- if $cfg.podDisruptionBudget.enabled }}
{{- $floor := ternary $cfg.autoscaling.minReplicas $cfg.replicaCount $cfg.autoscaling.enabled }}
{{- if le (int $floor) (int $cfg.podDisruptionBudget.minAvailable) }}
{{- fail (printf "%s.podDisruptionBudget.minAvailable (%d) must be lower than the %s replica count (%d), or no node holding one can ever be drained" $component (int $cfg.podDisruptionBudget.minAvailable) $component (int $floor)) }}
{{- end }}
{{- end }}
{{- if and $cfg.autoscaling.enabled (gt (int $cfg.autoscaling.minReplicas) (int $cfg.autoscaling.maxReplicas)) }}
{{- fail (printf "%s.autoscaling.minReplicas (%d) must not exceed %s.autoscaling.maxReplicas (%d)" $component (int $cfg.autoscaling.minReplicas) $component (int $cfg.autoscaling.maxReplicas)) }}
{{- end }}
{{- if and $cfg.autoscaling.enabled (not (dig "requests" "cpu" "" $cfg.resources)) }}
{{- fail (printf "%s.autoscaling needs %s.resources.requests.cpu: CPU utilisation is measured against the request" $component $component) }}
{{- end }}
{{- end }}
{{- if and $g.tls.enabled $g.tls.clientAuth (eq $g.tls.probe "tls") }}
{{- fail "gateway.tls.probe=tls cannot work with gateway.tls.clientAuth: the kubelet has no client certificate; use gateway.tls.probe=healthPort" }}
{{- end }}
{{- if and $g.tls.enabled (eq $g.tls.probe "healthPort") (eq (int $g.tls.healthPort) (int $g.port)) }}
{{- fail "gateway.tls.healthPort must differ from gateway.port" }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled .Values.metrics.podMonitor.enabled }}
{{- fail "metrics.serviceMonitor.enabled and metrics.podMonitor.enabled are both true: Prometheus would scrape every pod twice; enable one" }}
{{- end }}
{{- if and .Values.tests.enabled $g.tls.enabled $g.tls.clientAuth (not .Values.tests.tls.clientSecret) }}
{{- fail "tests.enabled with gateway.tls.clientAuth needs tests.tls.clientSecret (a kubernetes.io/tls Secret with a client certificate the gateway accepts), or set tests.enabled=false" }}
{{- end }}
{{- $ports := list (int $g.port) }}
{{- if and $g.tls.enabled (eq $g.tls.probe "healthPort") }}{{ $ports = append $ports (int $g.tls.healthPort) }}{{ end }}
{{- if $g.http.enabled }}{{ $ports = append $ports (int $g.http.port) }}{{ end }}
{{- if $g.metrics.enabled }}{{ $ports = append $ports (int $g.metrics.port) }}{{ end }}
{{- if ne (len $ports) (len (uniq $ports)) }}
{{- fail (printf "the gateway's ports must differ: port, tls.healthPort, http.port and metrics.port are %s" (join ", " $ports)) }}
{{- end }}
{{- if not (has $g.defaultModel $t.models) }}
{{- fail (printf "gateway.defaultModel (%s) must be one of triton.models (%s), or every request that names no model fails" $g.defaultModel (join ", " $t.models)) }}
{{- end }}
{{- end }}
